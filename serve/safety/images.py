"""Stage 9's rules, from the `images` section of the safety policy file: per category,
the classifier score from which an image is sent for review (delivered, and queued
for a person), blurred (delivered blurred, queued) or withheld (not delivered,
queued). The most severe action any category reaches wins. Pure: the classifier is
classifier.py, the stage is ImageService._check_images.

A plan's safety profile may replace a category's thresholds; the OpenAI route's
`moderation: low` applies the file's `low` thresholds where the profile allows it. An
`always` category (sexual content involving minors) no profile and no moderation
level can loosen: any action it reaches withholds the image, and its case is
restricted."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CODE = r"^[a-z][a-z0-9_]{0,63}$"
Action = Literal["allow", "review", "blur", "withhold"]
SEVERITY: dict[str, int] = {"allow": 0, "review": 1, "blur": 2, "withhold": 3}
# An always-on category the file gives no thresholds: withheld from this score.
ALWAYS_WITHHOLD = 0.5

Score = Annotated[float, Field(ge=0, le=1)]


class Thresholds(BaseModel):
    """From which score (inclusive) each action applies; an action left out never
    does. review <= blur <= withhold where set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    review: Score | None = None
    blur: Score | None = None
    withhold: Score | None = None
    reason: Annotated[str, Field(pattern=CODE)] | None = Field(
        None, description="the reason code its cases carry (default: the prompt category's, "
        "else image_CATEGORY)")

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        given = [(a, getattr(self, a)) for a in ("review", "blur", "withhold")
                if getattr(self, a) is not None]
        for (a, x), (b, y) in pairwise(given):
            if x > y:
                raise ValueError(f"{a} {x} is above {b} {y}: a surer score must never get a "
                                 "milder action")
        return self

    def action(self, score: float) -> Action:
        for a in ("withhold", "blur", "review"):
            t = getattr(self, a)
            if t is not None and score >= t:
                return a
        return "allow"

    def no_looser_than(self, base: Thresholds) -> bool:
        """Every action of `base` applies here from the same score or a lower one."""
        return all(getattr(base, a) is None
                   or (getattr(self, a) is not None and getattr(self, a) <= getattr(base, a))
                   for a in ("review", "blur", "withhold"))


Rules = dict[str, Thresholds]
# What a policy file that predates image safety (no `images` section) is judged by:
# the shipped file's thresholds for the shipped classifier's categories.
DEFAULT_THRESHOLDS: Rules = {"sexual": Thresholds(review=0.3, blur=0.5, withhold=0.7),
                             "suggestive": Thresholds(review=0.6)}


class ImageRules(BaseModel):
    """The safety policy file's `images` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: dict[Annotated[str, Field(pattern=CODE)], Thresholds] = Field(
        default_factory=lambda: dict(DEFAULT_THRESHOLDS), description="category -> "
        "thresholds; a category not listed is allowed whatever its score (a file with no "
        "`images` section gets the shipped ones)")
    low: dict[Annotated[str, Field(pattern=CODE)], Thresholds] = Field(
        default_factory=dict, description="replacements under the OpenAI route's "
        "`moderation: low`, for profiles that allow it")


@dataclass(frozen=True, slots=True)
class ImageVerdict:
    action: Action | Literal["unchecked"]
    category: str | None = None  # the category that decided it (None: allowed, unchecked)
    score: float | None = None
    restricted: bool = False  # an always-on category: quarantined, admins only
    scores: dict[str, float] | None = None  # what the classifier said (kept with the image)


ALLOW = ImageVerdict("allow")
UNCHECKED = ImageVerdict("unchecked")


def judge(scores: dict[str, float], rules: Rules, always: frozenset[str]) -> ImageVerdict:
    """The action for one image's scores. An always-on category outranks the rest."""
    worst = ALLOW
    for category, score in scores.items():
        t = rules.get(category)
        if category in always:
            t = t or Thresholds(withhold=ALWAYS_WITHHOLD)
            if t.action(score) != "allow":
                return ImageVerdict("withhold", category, score, restricted=True)
            continue
        if t is None:
            continue
        action = t.action(score)
        if (SEVERITY[action], score) > (SEVERITY[worst.action], worst.score or 0.0):
            worst = ImageVerdict(action, category, score)
    return worst if worst.action != "allow" else ALLOW
