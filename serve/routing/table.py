"""The routing document: per tier a primary revision, ordered fallbacks, switches
and breaker thresholds. Pure: no Ray, no I/O but `load_routing`.

Models are named by their models.lock key; the lock pins the revision. A fallback
or canary must accept every request its primary accepts (limits at least as wide)
and must never move traffic onto stricter commercial terms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError, TierDisabled, UnknownTier, describe
from ..lockfile import Lock, ModelEntry

Tier = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
_STRICTNESS = {"allowed": 0, "restricted": 1, "forbidden": 2}  # commercial_use


class _Strict(BaseModel):
    # Strict: "yes" is not a switch's true, nor "5" a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Canary(_Strict):
    model: str = Field(description="models.lock key that takes a share of the tier")
    weight: Annotated[float, Field(gt=0, lt=1)] = Field(description="share of the tier's requests")


class Route(_Strict):
    model: str = Field(description="models.lock key of the tier's primary revision")
    fallbacks: list[str] = Field(
        default_factory=list, max_length=8,
        description="tried in order when the primary is not ready, its breaker is open, or "
        "a request failed on it twice")
    force_fallback: bool = Field(
        False, description="the switch: serve from the fallbacks first (primary last)")
    disabled: Annotated[str, Field(min_length=1, max_length=500)] | None = Field(
        None, description="refuse the tier (503 tier_disabled) with this message")
    canary: Canary | None = Field(None, description="a share of the tier to a second revision")
    cost_weight: Annotated[float, Field(gt=0, le=1000)] = Field(
        1.0, description="cost units per megapixel of output on this tier")

    @model_validator(mode="after")
    def _distinct(self) -> Route:
        names = [self.model, *self.fallbacks, *([self.canary.model] if self.canary else [])]
        if len(set(names)) != len(names):
            raise ValueError(f"a revision appears twice among primary, fallbacks and canary: "
                             f"{names}")
        return self

    def candidates(self, draw: float) -> list[str]:
        """Revisions in the order to try; `draw` in [0, 1) picks the canary's share."""
        first = [self.model]
        if self.canary:
            first = ([self.canary.model, self.model] if draw < self.canary.weight
                     else [self.model, self.canary.model])
        return [*self.fallbacks, *first] if self.force_fallback else [*first, *self.fallbacks]


class BreakerConfig(_Strict):
    window_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        30.0, description="outcomes older than this are forgotten")
    min_requests: Annotated[int, Field(ge=1)] = Field(
        10, description="the error rate counts only from this many outcomes in the window")
    error_rate: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="open when this share of the window's outcomes failed")
    consecutive_failures: Annotated[int, Field(ge=1)] = Field(
        3, description="open after this many failures in a row")
    open_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        5.0, description="how long it stays open before letting probes through")
    half_open_probes: Annotated[int, Field(ge=1, le=100)] = Field(
        2, description="successful probes in a row that close it")
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        120.0, description="a model call still unanswered after this fails (and counts "
        "as a failure): Ray waits forever for a deployment with no replica")


class RoutingTable(_Strict):
    version: Annotated[int, Field(ge=1)] = Field(
        1, description="the document's revision: bump it on every change (imagegen "
        "fallback does); /v1/routing shows which one each ingress applied")
    tiers: dict[Tier, Route] = Field(min_length=1, description="tier -> route")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig,
                                   description="circuit breaker thresholds, per revision")
    switches: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")], bool] = Field(
        default_factory=dict, description="named on/off switches for other features")

    def route(self, tier: str) -> Route:
        """The tier's route; UnknownTier names the tiers that exist, TierDisabled
        carries the operator's message."""
        route = self.tiers.get(tier)
        if route is None:
            known = ", ".join(sorted(self.tiers))
            raise UnknownTier(f"unknown tier {tier!r}; known tiers: {known}",
                              details=[{"field": "tier", "type": "unknown_tier"}])
        if route.disabled:
            raise TierDisabled(f"tier {tier!r} is disabled: {route.disabled}")
        return route

    def resolve(self, tier: str) -> str:
        """The primary model name of a tier (UnknownTier if there is no such tier)."""
        route = self.tiers.get(tier)
        if route is None:
            self.route(tier)
        return route.model

    def tiers_of(self, model: str) -> list[str]:
        """Tiers whose primary is `model`."""
        return sorted(t for t, r in self.tiers.items() if r.model == model)

    def backed_by(self, model: str) -> list[str]:
        """Tiers `model` may serve: as primary, canary or fallback."""
        return sorted(t for t, r in self.tiers.items() if model in r.candidates(0.0))

    def routed_models(self) -> list[str]:
        """Every model some tier may send requests to."""
        return sorted({m for r in self.tiers.values() for m in r.candidates(0.0)})

    def cost_weight(self, tier: str, model: str, *, pinned: bool = False) -> float:
        """What a megapixel costs on `tier` when `model` served it: the tier's weight,
        or less when the model is the primary of a cheaper tier (a fallback never
        charges more than the tier, nor more than its own tier). A revision the
        caller pinned costs at least the dearest tier it serves in any role (primary,
        canary or fallback), and a revision no tier routes the dearest tier of all:
        pinning the frontier model from the draft tier pays the final price."""
        route = self.tiers[tier]
        if model == route.model:
            return route.cost_weight
        if pinned:
            serves = self.backed_by(model) or list(self.tiers)
            return max([route.cost_weight, *(self.tiers[t].cost_weight for t in serves)])
        own = [r.cost_weight for r in self.tiers.values() if r.model == model]
        return min([route.cost_weight, *own])


def _narrower(fallback: ModelEntry, primary: ModelEntry) -> list[str]:
    f, p = fallback.limits, primary.limits
    out = [f"{k} {getattr(f, k)} < {getattr(p, k)}"
           for k in ("max_width", "max_height", "max_steps", "max_guidance", "max_images")
           if getattr(f, k) < getattr(p, k)]
    if f.min_size > p.min_size:
        out.append(f"min_size {f.min_size} > {p.min_size}")
    return out


def _check_against_lock(table: RoutingTable, lock: Lock) -> list[str]:
    problems = []
    missing = [m for m in table.routed_models() if m not in lock.models]
    if missing:
        return [f"models not in models.lock: {', '.join(missing)}"]
    for tier, route in table.tiers.items():
        primary = lock.models[route.model]
        others = [*route.fallbacks, *([route.canary.model] if route.canary else [])]
        for name in others:
            other = lock.models[name]
            if narrower := _narrower(other, primary):
                problems.append(f"tiers.{tier}: {name} accepts less than {route.model} "
                                f"({', '.join(narrower)})")
            if _STRICTNESS[other.commercial_use] > _STRICTNESS[primary.commercial_use]:
                problems.append(f"tiers.{tier}: {name} is commercial_use "
                                f"{other.commercial_use!r}, stricter than {route.model}'s "
                                f"{primary.commercial_use!r}")
    return problems


def parse_routing(data: object, lock: Lock, *, origin: str = "routing") -> RoutingTable:
    """Validate a routing document against the lock; ConfigError names every problem."""
    try:
        table = RoutingTable.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{origin}: {describe(e)}") from None
    if problems := _check_against_lock(table, lock):
        raise ConfigError(f"{origin}: {'; '.join(problems)}")
    return table


class _StrictYAML(yaml.SafeLoader):
    """YAML as strict as the schema: a duplicate key is an error (PyYAML keeps the
    last, silently), and only true/false are booleans (YAML 1.1 also reads yes, no,
    on and off, so `force_fallback: yes` would flip a switch)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        if dup := next((k for i, k in enumerate(keys) if k in keys[:i]), None):
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {dup!r}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


_StrictYAML.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictYAML.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_routing_text(text: str, lock: Lock, *, origin: str = "routing") -> RoutingTable:
    try:
        data = yaml.load(text, Loader=_StrictYAML)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not YAML: {e}".replace("\n", " ")) from None
    return parse_routing(data, lock, origin=origin)


def load_routing(path: Path, lock: Lock) -> RoutingTable:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot load routing {path}: {e}") from None
    return parse_routing_text(text, lock, origin=str(path))
