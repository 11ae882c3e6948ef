"""Stage 4, the prompt policy: banned terms by category, in a versioned file, matched
after folding (normalise.py) by one Aho-Corasick automaton over whole words, with an
allowlist of phrases that may contain a banned word. A plan's safety profile turns
categories on or off; a category marked `always` (sexual content involving minors)
no profile can turn off. The answer names the category and its reason code, never
the term that matched."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import ahocorasick
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError, PromptBlocked, describe
from .images import ALWAYS_WITHHOLD, ImageRules, Rules, Thresholds
from .normalise import fold, term_forms, variants, warm

log = logging.getLogger("imagegen.safety")

_CODE = r"^[a-z][a-z0-9_]{0,63}$"
# Inflections every term also matches (a policy lists any others itself).
SUFFIXES = ("", "s", "es")


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: Annotated[str, Field(pattern=_CODE)] = Field(
        description="the stable reason code a blocked request answers with")
    description: str = Field("", description="what the category covers, for reviewers")
    always: bool = Field(False, description="no safety profile can switch it off")
    terms: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, description="banned words and phrases, matched as whole words")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    categories: list[str] | Literal["all"] = Field(
        "all", description="the categories checked (those marked always are checked anyway)")
    images: dict[Annotated[str, Field(pattern=_CODE)], Thresholds] = Field(
        default_factory=dict, description="image thresholds replacing the file's for these "
        "categories (an always-on category's only to be stricter)")
    low_moderation: bool = Field(True, description="whether the OpenAI route's "
                                 "`moderation: low` may apply the file's `low` thresholds")


class PolicyFile(BaseModel):
    """The prompt policy file (README § Safety)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Annotated[int, Field(ge=1)] = Field(description="bump on every change")
    categories: dict[Annotated[str, Field(pattern=_CODE)], Category] = Field(min_length=1)
    allowlist: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, description="phrases allowed although they contain a banned "
        "word (`breast cancer`)")
    profiles: dict[Annotated[str, Field(pattern=_CODE)], Profile] = Field(
        default_factory=lambda: {"default": Profile()},
        description="what a plan's safety_profile names; `default` checks every category")
    images: ImageRules = Field(default_factory=ImageRules,
                               description="stage 9: what classifier scores do to an image")

    @model_validator(mode="after")
    def _known(self) -> PolicyFile:
        if "default" not in self.profiles:
            raise ValueError("profiles must define 'default'")
        for name, p in self.profiles.items():
            unknown = [] if p.categories == "all" else sorted(set(p.categories) - set(self.categories))
            if unknown:
                raise ValueError(f"profile {name!r} names unknown categories {unknown}")
        always = {n for n, c in self.categories.items() if c.always}
        if unset := sorted(c for c in always & set(self.images.thresholds)
                           if self.images.thresholds[c].withhold is None):
            raise ValueError(f"images.thresholds of always-on categories {unset} must set "
                             "withhold: whatever they reach is withheld")
        if loosened := sorted(always & set(self.images.low)):
            raise ValueError(f"images.low may not name always-on categories {loosened}")
        for name, p in self.profiles.items():
            for category in sorted(always & set(p.images)):
                base = self.images.thresholds.get(category, Thresholds(withhold=ALWAYS_WITHHOLD))
                if not p.images[category].no_looser_than(base):
                    raise ValueError(f"profile {name!r} loosens the image thresholds of "
                                     f"always-on category {category!r}: only stricter ones "
                                     "may replace them")
        return self


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a text was blocked: its category and reason code (never the term)."""

    category: str
    reason: str
    field: str


class PromptPolicy:
    """One compiled policy file."""

    def __init__(self, spec: PolicyFile) -> None:
        self.spec = spec
        self.version = spec.version
        warm()  # the look-alike table (0.1 s): at load, never on a request
        self.always = frozenset(n for n, c in spec.categories.items() if c.always)
        banned: dict[str, set[str]] = {}
        for name, category in spec.categories.items():
            for term in category.terms:
                for form in term_forms(term):
                    if len(form.strip()) < 2:
                        raise ConfigError(f"prompt policy: category {name!r} has a term that "
                                          f"folds to {form.strip()!r}: too short to match "
                                          "safely")
                    for suffix in SUFFIXES:
                        banned.setdefault(form[:-1] + suffix + " ", set()).add(name)
        allowed: set[str] = set()
        for phrase in spec.allowlist:
            for suffix in SUFFIXES:
                key = fold(phrase)[:-1] + suffix + " "
                if key in banned:
                    raise ConfigError(f"prompt policy: allowlist phrase {phrase!r} is itself a "
                                      f"banned term (of {', '.join(sorted(banned[key]))})")
                allowed.add(key)
        self._automaton = ahocorasick.Automaton()
        for key, categories in banned.items():
            self._automaton.add_word(key, (len(key), frozenset(categories)))
        for key in allowed:
            self._automaton.add_word(key, (len(key), None))
        self._automaton.make_automaton()
        self.terms = sum(len(c.terms) for c in spec.categories.values())

    def image_rules(self, profile: str, moderation: str | None = None) -> Rules:
        """The thresholds an image is judged by under `profile` (and the OpenAI route's
        moderation level)."""
        p = self.spec.profiles.get(profile) or self.spec.profiles["default"]
        low = self.spec.images.low if moderation == "low" and p.low_moderation else {}
        # a profile's own thresholds outrank `low`: it never loosens a stricter profile
        return {**self.spec.images.thresholds, **low, **p.images}

    def reason_of(self, category: str) -> str:
        """An image category's reason code: its own, the prompt category's, or
        image_CATEGORY."""
        t = self.spec.images.thresholds.get(category)
        if t is not None and t.reason:
            return t.reason
        c = self.spec.categories.get(category)
        return c.reason if c else f"image_{category}"

    def categories_of(self, profile: str) -> frozenset[str]:
        p = self.spec.profiles.get(profile) or self.spec.profiles["default"]
        on = set(self.spec.categories) if p.categories == "all" else set(p.categories)
        return frozenset(on | self.always)

    def check(self, texts: dict[str, str], profile: str = "default") -> Verdict | None:
        """The banned category found in `texts` (field -> text) under `profile`, or
        None; an `always` category (sexual content involving minors) outranks the rest,
        whichever field it is in. A negative prompt says what to steer away from
        (`nsfw, nude` is the usual one): only the `always` categories apply to it."""
        on = self.categories_of(profile)
        found: list[tuple[str, str]] = []
        for field, text in texts.items():
            if not text:
                continue
            checked = self.always if field == "negative_prompt" else on
            for reading in variants(text):
                found += [(c, field) for c in self._scan(reading, checked)]
        if not found:
            return None
        category, field = min(found, key=lambda f: f[0] not in self.always)
        return Verdict(category, self.spec.categories[category].reason, field)

    def _scan(self, folded: str, on: frozenset[str]) -> list[str]:
        allowed: list[tuple[int, int]] = []
        banned: list[tuple[int, int, frozenset[str]]] = []
        for end, (length, categories) in self._automaton.iter(folded):
            span = (end - length + 1, end)
            if categories is None:
                allowed.append(span)
            elif categories & on:
                banned.append((*span, categories & on))
        out = []
        for start, end, categories in banned:
            # An allowlisted phrase covers its own words, never an `always` category.
            covered = any(a <= start and end <= b for a, b in allowed)
            out += [c for c in categories if not covered or c in self.always]
        return out


def parse_policy(text: str, origin: str) -> PromptPolicy:
    try:
        data = yaml.safe_load(text)
        return PromptPolicy(PolicyFile.model_validate(data))
    except yaml.YAMLError as e:
        raise ConfigError(f"prompt policy {origin}: not YAML: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"prompt policy {origin}: {describe(e)}") from None


def load_policy_file(path: Path) -> PromptPolicy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise ConfigError(f"prompt policy {path}: {e}") from None
    return parse_policy(text, str(path))


class LivePolicy:
    """The policy in force, reloaded from its file (or mounted ConfigMap) by the same
    watch as the routing document; a bad new version is refused and the last good
    one stays."""

    def __init__(self, policy: PromptPolicy, metrics=None) -> None:
        self.policy = policy
        self.metrics = metrics
        self.error: str | None = None

    def apply_text(self, text: str, origin: str) -> bool:
        try:
            policy = parse_policy(text, origin)
        except ConfigError as e:
            self.error = e.message
            log.error("prompt policy refused, keeping version %d: %s", self.policy.version,
                      e.message)
            if self.metrics is not None:
                self.metrics.inc("imagegen_policy_config_errors_total", 1)
            return False
        if policy.version != self.policy.version or policy.spec != self.policy.spec:
            log.warning("prompt policy version %d applied from %s (%d terms)", policy.version,
                        origin, policy.terms)
        self.policy, self.error = policy, None
        return True

    def unreachable(self, message: str) -> None:
        self.error = message

    def check(self, texts: dict[str, str], profile: str = "default") -> None:
        """PromptBlocked (403 prompt_blocked, naming the category) if any text is."""
        verdict = self.policy.check(texts, profile)
        if verdict is not None:
            raise PromptBlocked(
                f"the {verdict.field} was blocked by the prompt policy ({verdict.category})",
                category=verdict.category, reason=verdict.reason,
                details=[{"field": verdict.field, "type": verdict.reason}])
