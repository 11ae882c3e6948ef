"""The capacity planner's inputs: profiles, size mixes, tier loads, revision specs.
Pydantic models shared by planner.py (which sizes pools from them) and latency.py
(which models one revision's latency from them). Pure data and validation."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .policies import NodeType  # the node types and caps of the policy's cluster


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


BatchTable = dict[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]]


class SizeMix(_Strict):
    weight: Annotated[float, Field(gt=0)] = Field(description="relative share of requests")
    width: Annotated[int, Field(ge=1)] = Field(description="pixels")
    height: Annotated[int, Field(ge=1)] = Field(description="pixels")
    images: Annotated[int, Field(ge=1)] = Field(description="images per request")
    steps: Annotated[int, Field(ge=1)] = Field(description="denoising steps")

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


class Profile(_Strict):
    """One revision measured on one GPU type."""

    steps: Annotated[int, Field(ge=1)] = Field(description="steps the timings were taken at")
    seconds_per_megapixel: BatchTable = Field(
        min_length=1, description="batch images -> seconds per megapixel per image at `steps`"
    )
    peak_memory_gb: Annotated[float, Field(gt=0)] | BatchTable = Field(
        description="peak GPU memory of a replica: one number, or by batch images"
    )
    gpus_per_replica: Annotated[float, Field(gt=0)] = Field(description="GPUs per replica")
    max_batch_images: Annotated[int, Field(ge=1, le=1024)] = Field(
        description="most images in one pipeline call"
    )
    service_cv: Annotated[float, Field(ge=0, le=10)] = Field(
        0.0, description="run-to-run CV of a batch's time (0 deterministic, 1 exponential)"
    )
    threads: Annotated[float, Field(gt=0)] | None = Field(
        None, description="cores a running batch keeps busy, on a shared-cores node "
        "(its cpu_threads); None: gpus_per_replica"
    )

    @model_validator(mode="after")
    def _batches_take_longer(self) -> Profile:
        # A batch faster than a smaller one breaks the batching fixed point, and is
        # a measurement error anyway.
        times = sorted((b, b * t) for b, t in self.seconds_per_megapixel.items())
        for (b0, t0), (b1, t1) in pairwise(times):
            if t1 < t0:
                raise ValueError(
                    f"a batch of {b1} images ({b1} x spmp = {t1:.4g}) would finish before"
                    f" one of {b0} ({t0:.4g}): batch x seconds_per_megapixel must not fall"
                )
        return self

    def spmp(self, images: float) -> float:
        """Seconds per megapixel per image in a batch of `images`, at `steps`."""
        return _interpolate(self.seconds_per_megapixel, images, extrapolate=False)

    def peak_memory(self, images: float) -> float:
        if not isinstance(self.peak_memory_gb, dict):
            return self.peak_memory_gb
        # extrapolated: memory keeps growing with the batch, and guessing low OOMs
        return _interpolate(self.peak_memory_gb, images, extrapolate=True)

    def usable_batch(self, node: NodeType) -> int:
        """Largest batch (images) up to max_batch_images that fits in memory; 0: none."""
        memory = node.gpu_memory_gb if node.shared_cores else (
            self.gpus_per_replica * node.gpu_memory_gb)
        fits = [b for b in range(1, self.max_batch_images + 1) if self.peak_memory(b) <= memory]
        return max(fits, default=0)


class RevisionSpec(_Strict):
    profiles: dict[str, Profile] = Field(min_length=1, description="GPU type -> profile")
    min_replicas: Annotated[int, Field(ge=0)] = Field(0, description="floor")
    max_replicas: Annotated[int, Field(ge=1)] = Field(1000, description="ceiling")

    @model_validator(mode="after")
    def _ordered(self) -> RevisionSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}"
            )
        return self


class TierLoad(_Strict):
    revision: str = Field(description="revision serving this tier")
    rate_rps: Annotated[float, Field(ge=0)] = Field(description="requests per second")
    priority: int = Field(description="higher gets GPUs first (final > draft > batch)")
    slo_p95_s: Annotated[float, Field(gt=0)] = Field(description="p95 latency objective")
    mix: list[SizeMix] | None = Field(None, description="this tier's sizes; None: the global mix")


class PlanInputs(_Strict):
    tiers: dict[str, TierLoad] = Field(min_length=1, description="tier -> load")
    revisions: dict[str, RevisionSpec] = Field(description="revision -> spec")
    nodes: dict[str, NodeType] = Field(min_length=1, description="GPU type -> node type")
    mix: list[SizeMix] = Field(min_length=1, description="request sizes of every tier")
    overhead_s: Annotated[float, Field(ge=0)] = Field(
        0.0, description="latency per request outside the pipeline (HTTP, ingress, handle "
        "hop, encoding): `imagegen bench serve`'s added p50 at c=1"
    )
    target_utilisation: Annotated[float, Field(gt=0, le=1)] = Field(
        0.85, description="highest demand / peak (full-batch) throughput a plan accepts"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PlanInputs:
        for tier, load in self.tiers.items():
            if load.revision not in self.revisions:
                raise ValueError(f"tier {tier!r}: unknown revision {load.revision!r}")
        for name, spec in self.revisions.items():
            if not set(spec.profiles) & set(self.nodes):
                raise ValueError(f"revision {name!r}: no profile for any of {sorted(self.nodes)}")
            for gpu, profile in spec.profiles.items():
                node = self.nodes.get(gpu)
                if node is None or node.shared_cores:
                    continue  # another cluster's GPU; or cores Ray shares out by fractions
                per_node = node.gpus_per_node / profile.gpus_per_replica
                if per_node < 1 or abs(per_node - round(per_node)) > 1e-9:
                    raise ValueError(
                        f"revision {name!r} on {gpu!r}: {profile.gpus_per_replica} GPUs per"
                        f" replica do not tile a {node.gpus_per_node}-GPU node"
                    )
        return self


def _interpolate(table: dict[int, float], x: float, *, extrapolate: bool) -> float:
    keys = sorted(table)
    if len(keys) == 1:
        return table[keys[0]]
    if x <= keys[0] and not extrapolate:
        return table[keys[0]]
    if x >= keys[-1] and not extrapolate:
        return table[keys[-1]]
    i = max(1, min(len(keys) - 1, sum(k < x for k in keys)))
    x0, x1 = keys[i - 1], keys[i]
    return table[x0] + (table[x1] - table[x0]) * (x - x0) / (x1 - x0)
