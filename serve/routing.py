"""Routing: which model revision serves each tier. Pure: no Ray, no I/O but load.

The table names models by their models.lock key; the lock pins the revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, UnknownTier, describe
from .lockfile import Lock

Tier = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="models.lock key that serves this tier")
    cost_weight: Annotated[float, Field(gt=0, le=1000)] = Field(
        1.0, description="cost units per megapixel of output on this tier"
    )


class RoutingTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tiers: dict[Tier, Route] = Field(min_length=1, description="tier -> route")

    def resolve(self, tier: str) -> str:
        """The model name for a tier; UnknownTier names the tiers that exist."""
        route = self.tiers.get(tier)
        if route is None:
            known = ", ".join(sorted(self.tiers))
            raise UnknownTier(f"unknown tier {tier!r}; known tiers: {known}")
        return route.model

    def tiers_of(self, model: str) -> list[str]:
        return sorted(t for t, r in self.tiers.items() if r.model == model)

    def routed_models(self) -> list[str]:
        return sorted({r.model for r in self.tiers.values()})


def parse_routing(data: object, lock: Lock, *, origin: str = "routing") -> RoutingTable:
    """Validate a routing document against the lock: every model must exist there."""
    try:
        table = RoutingTable.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{origin}: {describe(e)}") from None
    missing = [m for m in table.routed_models() if m not in lock.models]
    if missing:
        raise ConfigError(f"{origin}: models not in models.lock: {', '.join(missing)}")
    return table


def load_routing(path: Path, lock: Lock) -> RoutingTable:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot load routing {path}: {e}") from None
    return parse_routing(data, lock, origin=str(path))
