"""Stage 3, render: a request's template and variables -> the prompt, the negative
prompt and the alt text. Structural: the template's text was split into literal
pieces and `{variable}` slots at load; a value is validated against its declared
type and put in its slot as text, so it can never become a format string or template
syntax, and never add, close or remove the locked style tokens."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    ConfigError,
    InvalidRequest,
    InvalidVariable,
    TemplateNotApproved,
    TemplateRetired,
    UnknownTemplate,
)
from ..safety.normalise import fold
from ..schemas import GenerateRequest
from .library import SLOT, EnumVar, Library, NumberVar, StringVar, Template, load_library

log = logging.getLogger("imagegen.templates")

# What a string value may never hold: prompt-weighting and template syntax (`(word:1.4)`,
# `[a|b]`, `{x}`, `<lora:...>`), backslashes, and any control character.
_SMUGGLING = re.compile(r"[{}\[\]()<>|\\\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Rendered:
    prompt: str
    negative_prompt: str
    template: Template | None = None
    alt_text: str | None = None
    values: dict[str, str] | None = None  # each string variable's value, for the policy


def _bad(name: str, message: str, kind: str = "invalid_variable") -> InvalidVariable:
    return InvalidVariable(f"variable {name}: {message}",
                           details=[{"field": f"variables.{name}", "type": kind}])


def _fill(text: str, values: dict[str, str]) -> str:
    def piece(m: re.Match) -> str:
        tok = m.group(0)
        return tok[0] if tok in ("{{", "}}") else values[m.group(1)]

    return SLOT.sub(piece, text)


class Styles:
    """The style library in force, reloaded from its directory by a watch; a bad new
    version of any file is refused and the last good library stays."""

    def __init__(self, library: Library, metrics=None,
                 today=lambda: dt.datetime.now(dt.UTC).date()) -> None:
        self.library = library
        self.metrics = metrics
        self.today = today
        self.error: str | None = None

    def reload(self, directory: Path) -> bool:
        try:
            library = load_library(directory)
        except ConfigError as e:
            self.error = e.message
            log.error("style library refused, keeping %d templates: %s", len(self.library),
                      e.message)
            if self.metrics is not None:
                self.metrics.inc("imagegen_template_config_errors_total", 1)
            return False
        self.library, self.error = library, None
        return True

    def resolve(self, ref: str, *, drafts: bool = False) -> Template:
        """`id` (its newest servable version) or `id@version`, or why not."""
        tid, _, version = ref.partition("@")
        versions = self.library.by_id.get(tid)
        if not versions:
            raise UnknownTemplate(f"no template {tid!r} (GET /v1/templates lists them)",
                                  details=[{"field": "template", "type": "unknown_template"}])
        today = self.today()
        if version:
            t = versions.get(int(version))
            if t is None:
                raise UnknownTemplate(f"template {tid} has no version {version} (it has "
                                      f"{', '.join(map(str, versions))})",
                                      details=[{"field": "template", "type": "unknown_template"}])
        else:
            usable = [t for t in versions.values() if not t.retired(today)
                      and (drafts or t.status != "draft")]
            t = usable[-1] if usable else list(versions.values())[-1]
        if t.status == "draft" and not drafts:
            raise TemplateNotApproved(f"template {t.ref} is a draft; only approved versions "
                                      "serve (imagegen templates approve)",
                                      details=[{"field": "template", "type": "not_approved"}])
        if t.retired(today):
            raise TemplateRetired(f"template {t.ref} was retired on {t.deprecated_on}; use "
                                  f"{t.successor}", successor=t.successor,
                                  details=[{"field": "template", "type": "retired",
                                            "successor": t.successor}])
        return t

    def render(self, req: GenerateRequest, *, drafts: bool = False) -> Rendered:
        """The prompts of a request that names a template."""
        t = self.resolve(req.template, drafts=drafts)
        if req.tier not in t.tiers:
            raise InvalidRequest(f"template {t.ref} allows tiers {', '.join(t.tiers)}",
                                 details=[{"field": "tier", "type": "template_tier"}])
        if req.negative_prompt:
            raise InvalidRequest(f"template {t.ref} sets the negative prompt",
                                 details=[{"field": "negative_prompt", "type": "template"}])
        given = dict(req.variables or {})
        if req.prompt is not None:  # the OpenAI route always sends one
            if t.free_text is None:
                raise InvalidRequest(f"template {t.ref} has no free-text variable for the "
                                     "prompt; give variables instead",
                                     details=[{"field": "prompt", "type": "template"}])
            if t.free_text in given:
                raise _bad(t.free_text, "given twice (as the prompt and as a variable)")
            given[t.free_text] = req.prompt
        values = self._values(t, given)
        # Locked tokens first: a text encoder keeps the first 77 tokens, so a long value
        # can push out the end of a prompt, never its style.
        prompt = ", ".join([*t.locked_tokens, _fill(t.prompt, values)])
        alt = _fill(t.alt_text, values) if t.alt_text else None
        strings = {k: values[k] for k, v in t.variables.items() if isinstance(v, StringVar)}
        return Rendered(prompt, t.negative_prompt, t, alt, strings)

    def _values(self, t: Template, given: dict[str, object]) -> dict[str, str]:
        if unknown := sorted(set(given) - set(t.variables)):
            raise _bad(unknown[0], f"template {t.ref} has no such variable (it has "
                                   f"{', '.join(t.variables) or 'none'})", "unknown_variable")
        out = {}
        for name, spec in t.variables.items():
            value = given.get(name, spec.default)
            if value is None:
                raise _bad(name, "is required", "missing")
            out[name] = _check(name, spec, value, t)
        return out


def _check(name: str, spec, value: object, t: Template) -> str:
    if isinstance(spec, EnumVar):
        if not isinstance(value, str) or value not in spec.values:
            raise _bad(name, f"must be one of {', '.join(spec.values)}")
        return value
    if isinstance(spec, NumberVar):
        number = _number(name, value)
        if not spec.min <= number <= spec.max:
            raise _bad(name, f"{number:g} is outside {spec.min:g}..{spec.max:g}")
        if spec.integer and number != int(number):
            raise _bad(name, "must be a whole number")
        # as written: never 1e+06 for a million, nor -0
        return str(int(number)) if number == int(number) else repr(number)
    if not isinstance(value, str):
        raise _bad(name, "must be a string")
    if not value.strip():
        raise _bad(name, "is blank")
    if len(value) > spec.max_length:
        raise _bad(name, f"is longer than {spec.max_length} characters", "too_long")
    if _SMUGGLING.search(value):
        raise _bad(name, "may not hold brackets, braces, angle brackets, | or \\ (prompt "
                         "syntax) or control characters", "syntax")
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        raise _bad(name, "does not match the template's pattern", "pattern")
    folded = fold(value)  # look-alike letters and spacing too
    if any(fold(tok).strip() in folded for tok in t.locked_tokens):
        raise _bad(name, "may not hold the template's locked style tokens", "locked_token")
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise _bad(name, "must be a number")
    try:
        number = float(value)  # gRPC carries every variable as a string
    except (ValueError, OverflowError, TypeError):  # OverflowError: an int past 1e308
        raise _bad(name, "must be a finite number") from None
    if not math.isfinite(number):
        raise _bad(name, "must be a finite number")
    return number
