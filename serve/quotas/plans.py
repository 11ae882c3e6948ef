"""Plans: what a principal may ask for and what it pays. Pure: parsing, validation
and the admission checks; the ledger that spends the budget comes next.

The plans file (`plans_file`, default serve/plans.yaml) names each plan; a key's
plan must be one of them (a keys file naming another refuses to start; a stored
key naming another is 403 at request time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import PlanLimit
from ..lockfile import ModelEntry
from . import yamlfile

Units = Annotated[float, Field(gt=0)]


class Bucket(BaseModel):
    """A token bucket in cost units: `burst` at most, refilled at `refill_per_s`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    burst: Units
    refill_per_s: Annotated[float, Field(ge=0)]


class PriceBand(BaseModel):
    """Price per cost unit while the month's volume is up to `up_to` units."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    up_to: Units | None = None  # None: every unit beyond the previous band
    price: Annotated[float, Field(ge=0)]


class PlanSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    tiers: list[str] = Field(min_length=1, description="tiers this plan may call")
    max_n: Annotated[int, Field(ge=1, le=64)] = 8
    max_megapixels: Units = Field(16.0, description="output pixels per request, all images")
    raw_prompts: bool = Field(True, description="a raw prompt is allowed (else templates only)")
    watermark: bool = Field(False, description="every image is watermarked")
    template_drafts: bool = Field(False, description="draft template versions serve too "
                                  "(for testing them)")
    safety_profile: str = Field("default", description="the prompt policy's profile: which "
                                "categories are checked (README § Safety)")
    commercial: bool = Field(False, description="commercial use: only revisions whose "
                             "commercial_use is allowed may serve it, fallbacks included")
    bucket: Bucket = Bucket(burst=100, refill_per_s=1)
    daily_units: Units | None = Field(None, description="cost units per UTC day")
    pricing: list[PriceBand] = Field(default_factory=lambda: [PriceBand(price=0.0)],
                                     min_length=1)
    cache_hit_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    retention_days: Annotated[int, Field(ge=1, le=3650)] | None = Field(
        30, description="how long its images and sidecars are kept (`imagegen storage gc` "
        "removes them after); none: kept until deleted")

    @model_validator(mode="after")
    def _bands(self) -> PlanSpec:
        bounds = [b.up_to for b in self.pricing]
        if bounds[-1] is not None or None in bounds[:-1]:
            raise ValueError("pricing: only the last band is open-ended (up_to omitted)")
        if bounds[:-1] != sorted(set(bounds[:-1])):
            raise ValueError("pricing: up_to must increase band by band")
        return self


class Plans(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plans: dict[str, PlanSpec] = Field(min_length=1)

    def get(self, name: str) -> PlanSpec:
        plan = self.plans.get(name)
        if plan is None:
            raise PlanLimit(f"plan {name!r} is not configured; ask an admin to fix the key",
                            details=[{"field": "plan", "type": "unknown_plan"}])
        return plan


def load_plans(path: Path) -> Plans:
    """The plans file, validated."""
    return yamlfile.load(path, Plans, "plans file")


def unrouted_tiers(plans: Plans, tiers: set[str]) -> dict[str, list[str]]:
    """Per plan, the tiers it names that the routing document does not have (worth a
    warning: a typo, or a tier not deployed here)."""
    return {name: sorted(set(p.tiers) - tiers) for name, p in plans.plans.items()
            if set(p.tiers) - tiers}


def _limit(field: str, message: str) -> PlanLimit:
    return PlanLimit(message, details=[{"field": field, "type": "plan_limit",
                                        "message": message}])


def admit(plan_name: str, plan: PlanSpec, *, tier: str, n: int, megapixels: float,
          raw_prompt: bool = True) -> None:
    """What the plan allows, before any budget is spent; PlanLimit naming the field."""
    if tier not in plan.tiers:
        raise _limit("tier", f"plan {plan_name!r} does not include tier {tier!r} (it has "
                             f"{', '.join(plan.tiers)})")
    if n > plan.max_n:
        raise _limit("n", f"n {n} exceeds plan {plan_name!r}'s max_n {plan.max_n}")
    if megapixels > plan.max_megapixels:
        raise _limit("size", f"{megapixels:g} megapixels exceed plan {plan_name!r}'s "
                             f"max_megapixels {plan.max_megapixels:g}")
    if raw_prompt and not plan.raw_prompts:
        raise _limit("prompt", f"plan {plan_name!r} allows templates only, not raw prompts")


def commercially_usable(plan: PlanSpec, entry: ModelEntry) -> bool:
    """A commercial plan is served only by revisions whose licence allows it
    (`restricted` needs an agreement the service cannot check: not usable)."""
    return not plan.commercial or entry.commercial_use == "allowed"


def price(plan: PlanSpec, units: float, month_volume: float) -> float:
    """What `units` cost after `month_volume` units already this month (progressive:
    each unit at its band's price)."""
    total, at, left = 0.0, month_volume, units
    for band in plan.pricing:
        room = left if band.up_to is None else max(0.0, band.up_to - at)
        take = min(left, room)
        total += take * band.price
        at, left = at + take, left - take
        if left <= 0:
            break
    return round(total, 6)
