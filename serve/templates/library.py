"""Templates as files: one YAML file per template version, from the package default
(`serve/templates/styles/`) or `styles_dir` (a mounted ConfigMap). A version is
immutable once approved: its approval records who, when and the sha256 of its
content, and a file whose content no longer matches is refused at load. Only
approved versions serve (a plan with `template_drafts` may call drafts too); a
deprecated one serves until its date, then is refused naming its successor."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError, describe

_ID = r"^[a-z0-9][a-z0-9-]{0,63}$"
_NAME = r"^[a-z][a-z0-9_]{0,31}$"
# `{name}` fills a declared variable; `{{` and `}}` are literal braces; nothing else
# (no attribute access, no format spec, no conversion) is template syntax.
SLOT = re.compile(r"\{\{|\}\}|\{([a-z][a-z0-9_]{0,31})\}|[{}]")


class EnumVar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["enum"]
    values: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=1)
    default: str | None = None


class StringVar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["string"]
    max_length: Annotated[int, Field(ge=1, le=500)] = 100
    pattern: str | None = Field(None, description="the whole value must match it")
    default: str | None = None


class NumberVar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["number"]
    min: float
    max: float
    integer: bool = False
    default: float | None = None


Variable = Annotated[EnumVar | StringVar | NumberVar, Field(discriminator="type")]


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    by: Annotated[str, Field(min_length=1, max_length=128)]
    at: dt.datetime
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Template(BaseModel):
    """One template version (README § Templates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=_ID)]
    version: Annotated[int, Field(ge=1)]
    owner: Annotated[str, Field(min_length=1, max_length=128)]
    status: Literal["draft", "approved", "deprecated"] = "draft"
    kind: Literal["photographic", "illustration", "other"] = Field(
        description="photographic and illustration styles never share a negative prompt")
    description: str = ""
    prompt: Annotated[str, Field(min_length=1, max_length=2000)] = Field(
        description="the prompt with {variable} slots; its literal text is locked")
    locked_tokens: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, description="style tokens always appended; no value may hold one")
    negative_prompt: Annotated[str, Field(max_length=2000)] = ""
    variables: dict[Annotated[str, Field(pattern=_NAME)], Variable] = Field(default_factory=dict)
    free_text: str | None = Field(None, description="the string variable the OpenAI route's "
                                  "`prompt` fills")
    tiers: list[str] = Field(default_factory=lambda: ["draft", "final"])
    alt_text: Annotated[str, Field(max_length=500)] = Field(
        "", description="the images' drafted alt text, with the same {variable} slots")
    preview: str | None = Field(None, description="where the preview grid is (a URL or key)")
    deprecated_on: dt.date | None = Field(None, description="refused from this day (UTC)")
    successor: str | None = Field(None, description="id@version to move to")
    approved: Approval | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Template:
        for field in ("prompt", "alt_text"):
            if any(m.group(0) in "{}" for m in SLOT.finditer(getattr(self, field))):
                raise ValueError(f"{field} has a stray brace or a bad slot: slots are "
                                 "{lowercase_name}, literal braces {{ and }}")
            used = slots(getattr(self, field))
            if unknown := sorted(used - set(self.variables)):
                raise ValueError(f"{field} uses undeclared variables {unknown}")
        if unused := sorted(set(self.variables) - slots(self.prompt)):
            raise ValueError(f"variables {unused} are not in the prompt")
        if self.free_text is not None and not isinstance(self.variables.get(self.free_text),
                                                         StringVar):
            raise ValueError(f"free_text {self.free_text!r} is not a string variable")
        if self.status != "draft" and self.approved is None:
            raise ValueError(f"status {self.status} needs an approval (imagegen templates "
                             "approve)")
        if self.status == "deprecated" and not (self.deprecated_on and self.successor):
            raise ValueError("a deprecated template names deprecated_on and successor")
        for name, v in self.variables.items():
            if isinstance(v, EnumVar) and v.default is not None and v.default not in v.values:
                raise ValueError(f"variable {name}: default {v.default!r} is not a value")
            if isinstance(v, NumberVar) and v.min > v.max:
                raise ValueError(f"variable {name}: min > max")
            if isinstance(v, StringVar) and v.pattern is not None:
                try:
                    re.compile(v.pattern)
                except re.error as e:
                    raise ValueError(f"variable {name}: bad pattern: {e}") from None
        return self

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def content_sha256(self) -> str:
        """What an approval pins: every field but the approval and the status."""
        # Fields left at their default are not hashed: a field added later with a
        # default never breaks an approval.
        body = self.model_dump(mode="json", exclude_defaults=True,
                               exclude={"approved", "status", "deprecated_on", "successor"})
        return hashlib.sha256(yaml.safe_dump(body, sort_keys=True).encode()).hexdigest()

    def retired(self, today: dt.date) -> bool:
        return self.deprecated_on is not None and today >= self.deprecated_on


def slots(text: str) -> set[str]:
    return {m.group(1) for m in SLOT.finditer(text) if m.group(1)}


class Library:
    """Every template version, by id, newest last."""

    def __init__(self, templates: list[Template], origin: str) -> None:
        self.origin = origin
        self.by_id: dict[str, dict[int, Template]] = {}
        for t in templates:
            versions = self.by_id.setdefault(t.id, {})
            if t.version in versions:
                raise ConfigError(f"templates {origin}: {t.ref} is defined twice")
            versions[t.version] = t
        self.by_id = {k: dict(sorted(v.items())) for k, v in sorted(self.by_id.items())}
        _no_shared_negatives(templates, origin)
        for t in templates:
            sid, _, sv = (t.successor or "").partition("@")
            if t.successor and not (sv.isdigit() and int(sv) in self.by_id.get(sid, {})):
                raise ConfigError(f"templates {origin}: {t.ref}'s successor {t.successor!r} is "
                                  "not in the library")

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_id.values())

    def all(self) -> list[Template]:
        return [t for versions in self.by_id.values() for t in versions.values()]


def _no_shared_negatives(templates: list[Template], origin: str) -> None:
    kinds: dict[str, set[str]] = {}
    for t in templates:
        if t.negative_prompt and t.kind in ("photographic", "illustration"):
            kinds.setdefault(t.negative_prompt.strip().lower(), set()).add(t.kind)
    if shared := [n for n, k in kinds.items() if len(k) > 1]:
        raise ConfigError(f"templates {origin}: photographic and illustration templates "
                          f"share the negative prompt {shared[0][:60]!r}")


def parse_template(text: str, origin: str) -> Template:
    try:
        t = Template.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"template {origin}: not YAML: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"template {origin}: {describe(e)}") from None
    if t.approved is not None and t.approved.sha256 != t.content_sha256():
        raise ConfigError(f"template {origin}: {t.ref} was approved by {t.approved.by} and "
                          "its content has changed since; an approved version is immutable: "
                          "make a new version")
    return t


def template_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.yaml") if p.is_file())


def load_library(directory: Path) -> Library:
    """Every `*.yaml` in `directory`; ConfigError naming the first bad file."""
    if not Path(directory).is_dir():
        raise ConfigError(f"styles_dir {directory} is not a directory")
    templates = []
    for path in template_files(directory):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise ConfigError(f"template {path}: {e}") from None
        templates.append(parse_template(text, str(path)))
    return Library(templates, str(directory))
