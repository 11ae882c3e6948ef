"""What the load users send: a weighted tier mix, raw prompts and the style library's
templates, a fresh seed per request (every request reaches a model) or a small
repeated set (cache runs), and each recipe as the body of every transport.

Plain functions with no locust import, so the unit tests and the locustfile share
them (locust imports this file from loadtests/, not as a package).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

# Benign prompts (the prompt policy passes them), also used to fill templates'
# string variables.
PROMPTS = (
    "a lighthouse at dusk", "a red fox in snow", "a bowl of lemons on a wooden table",
    "a sailing boat on a calm lake", "a city street in the rain", "a mountain cabin at dawn",
    "a brass desk lamp", "a ceramic coffee mug", "a field of sunflowers", "an old stone bridge",
)
SEED_LIMIT = 2**32 - 8  # image i uses seed + i, and n is at most 8
CACHE_SET_SIZE = 8


@dataclass(frozen=True)
class Template:
    """One servable template version from GET /v1/templates, reduced to what a load
    test fills in."""

    ref: str  # "id@version"
    tiers: tuple[str, ...]
    free_text: str | None
    variables: dict[str, dict] = field(default_factory=dict)  # name -> declaration


@dataclass(frozen=True)
class Recipe:
    tier: str
    seed: int
    n: int = 1
    prompt: str | None = None
    template: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    free_text: str | None = None  # the template variable the OpenAI route's prompt fills


def parse_weights(text: str) -> dict[str, float]:
    """`draft=4,final=1` -> {"draft": 4.0, "final": 1.0}; a bad term raises ValueError
    quoting it."""
    weights: dict[str, float] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        tier, sep, value = term.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or not tier.strip() or w < 0:
            raise ValueError(f"bad tier weight {term!r}: expected TIER=WEIGHT, weight >= 0")
        weights[tier.strip()] = w
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"tier mix {text!r} has no positive weight")
    return weights


def servable_templates(listing: dict) -> list[Template]:
    """The approved versions in a GET /v1/templates answer (drafts and deprecated
    versions are refused or sunset: not load)."""
    out = []
    for t in listing.get("templates", []):
        if t.get("status") != "approved":
            continue
        out.append(Template(f"{t['id']}@{t['version']}", tuple(t.get("tiers", ())),
                            t.get("free_text"), dict(t.get("variables", {}))))
    return out


def fill(decl: dict, rng: random.Random) -> Any | None:
    """A valid value for one variable declaration, or None when no sample fits."""
    kind = decl.get("type")
    if kind == "enum":
        return rng.choice(decl["values"])
    if kind == "number":
        lo, hi = decl["min"], decl["max"]
        return rng.randint(int(lo), int(hi)) if decl.get("integer") else round(
            rng.uniform(lo, hi), 3)
    if kind == "string":
        pattern, limit = decl.get("pattern"), decl.get("max_length", 100)
        fits = [p for p in PROMPTS if len(p) <= limit
                and (pattern is None or re.fullmatch(pattern, p))]
        return rng.choice(fits) if fits else None
    return None


class Mix:
    """Draws recipes: tier by weight, a template for `template_share` of them (those
    serving the tier), else a raw prompt; a fresh seed each, or with `cache` one of a
    fixed set of CACHE_SET_SIZE recipes (the same in every user and run)."""

    def __init__(self, weights: dict[str, float], templates: list[Template] = (),
                 template_share: float = 0.5, max_n: int = 1, cache: bool = False,
                 rng: random.Random | None = None) -> None:
        self.weights = weights
        self.templates = list(templates)
        self.template_share = template_share
        self.max_n = max_n
        self.rng = rng or random.Random()
        fixed = random.Random(1234)  # the same set in every user and run
        self.cache_set = ([self._draw(fixed, fixed_seed=True) for _ in range(CACHE_SET_SIZE)]
                          if cache else None)

    def next(self) -> Recipe:
        if self.cache_set is not None:
            return self.rng.choice(self.cache_set)
        return self._draw(self.rng)

    def _draw(self, rng: random.Random, fixed_seed: bool = False) -> Recipe:
        tier = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        n = rng.randint(1, self.max_n)
        seed = rng.randrange(10_000) if fixed_seed else rng.randrange(SEED_LIMIT)
        usable = [t for t in self.templates if tier in t.tiers]
        if usable and rng.random() < self.template_share:
            t = rng.choice(usable)
            values = {name: fill(d, rng) for name, d in t.variables.items()}
            if all(v is not None for v in values.values()):
                return Recipe(tier, seed, n, template=t.ref, variables=values,
                              free_text=t.free_text)
        return Recipe(tier, seed, n, prompt=rng.choice(PROMPTS))


def http_body(r: Recipe) -> dict:
    """POST /v1/images."""
    body: dict[str, Any] = {"tier": r.tier, "seed": r.seed, "n": r.n}
    if r.template:
        body.update(template=r.template, variables=r.variables)
    else:
        body["prompt"] = r.prompt
    return body


def openai_body(r: Recipe) -> dict:
    """POST /v1/images/generations: the tier as `model`; with a template, `prompt`
    fills its free-text variable (this route always sends a prompt)."""
    body: dict[str, Any] = {"model": r.tier, "n": r.n, "seed": r.seed}
    if r.template and r.free_text in r.variables:
        body["prompt"] = r.variables[r.free_text]
        body.update(template=r.template,
                    variables={k: v for k, v in r.variables.items() if k != r.free_text})
    else:
        body["prompt"] = r.prompt or PROMPTS[0]
    return body


def grpc_fields(r: Recipe) -> dict:
    """imagegen.v1.GenerateRequest fields (variables as text, as the proto says)."""
    fields: dict[str, Any] = {"tier": r.tier, "seed": r.seed, "n": r.n}
    if r.template:
        fields.update(template=r.template,
                      variables={k: str(v) for k, v in r.variables.items()})
    else:
        fields["prompt"] = r.prompt
    return fields
