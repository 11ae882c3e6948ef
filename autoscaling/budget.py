"""The shared GPU budget: how many replicas each revision gets when they all draw
on one pool. Pure and Ray-free: the planner, the simulator and the Serve
application-level policy (serve_policy.decide) all divide GPUs with `allocate`;
the policy adds the step-by-step rule that keeps replicas still holding GPUs
counted, which the simulator's own autoscaler models separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby

# Budgets and replica sizes are floats (0.5 GPU replicas); sums of them drift by
# ulps, and a replica must not be refused for 1e-15 of a GPU.
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Demand:
    """One revision's claim on the budget. `desired` is replicas wanted from queue
    pressure (a float; the allocation rounds it up); higher `priority` wins."""

    name: str
    priority: int
    gpus_per_replica: float
    min_replicas: int
    max_replicas: int
    desired: float

    def __post_init__(self) -> None:
        if self.gpus_per_replica < 0 or not math.isfinite(self.gpus_per_replica):
            raise ValueError(f"{self.name}: gpus_per_replica {self.gpus_per_replica} < 0")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"{self.name}: need 0 <= min_replicas {self.min_replicas}"
                f" <= max_replicas {self.max_replicas}"
            )
        if not self.desired >= 0:  # also rejects NaN
            raise ValueError(f"{self.name}: desired {self.desired} < 0")

    @property
    def wanted(self) -> int:
        """Whole replicas wanted: desired rounded up, within [min, max]."""
        return min(self.max_replicas, max(self.min_replicas, math.ceil(self.desired - _EPS)))


def allocate(demands: list[Demand], gpu_budget: float) -> dict[str, int]:
    """Replicas per revision within `gpu_budget` GPUs.

    1. Every revision gets its min_replicas, highest priority first; when the mins
       do not all fit, lower priorities get what is left (maybe none).
    2. The rest goes to wanted replicas, highest priority first. Revisions of equal
       priority share it in proportion to `desired` (one replica at a time to the
       least served, ties by name), so the result is deterministic.
    A replica that does not fit is skipped, so a smaller lower-priority replica may
    still use what a larger one cannot. Never above max_replicas or the budget.
    """
    names = [d.name for d in demands]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate demand names: {sorted(names)}")
    if not gpu_budget >= 0:
        raise ValueError(f"gpu_budget {gpu_budget} < 0")
    order = sorted(demands, key=lambda d: (-d.priority, d.name))
    got = {d.name: 0 for d in order}
    left = float(gpu_budget)
    for d in order:
        got[d.name] = _fit(d.min_replicas, d.gpus_per_replica, left)
        left -= got[d.name] * d.gpus_per_replica
    for _, group in groupby(order, key=lambda d: d.priority):
        left = _fill(list(group), got, left)
    return got


def _fit(n: int, gpus: float, left: float) -> int:
    """How many of n replicas of `gpus` GPUs fit in `left`."""
    if gpus == 0:
        return n
    return max(0, min(n, math.floor((left + _EPS) / gpus)))


def _fill(group: list[Demand], got: dict[str, int], left: float) -> float:
    """Raise one priority group towards its wanted counts; returns what is left."""
    short = [d for d in group if got[d.name] < d.wanted]
    need = sum((d.wanted - got[d.name]) * d.gpus_per_replica for d in short)
    if need <= left + _EPS:  # the common case: no sharing needed
        for d in short:
            got[d.name] = d.wanted
        return left - need
    while True:
        open_ = [d for d in short
                 if got[d.name] < d.wanted and d.gpus_per_replica <= left + _EPS]
        if not open_:
            return left
        d = min(open_, key=lambda d: (_served(got[d.name], d.desired), d.name))
        got[d.name] += 1
        left -= d.gpus_per_replica


def _served(got: int, desired: float) -> float:
    # desired 0 yet short: only a min that did not fit, already settled by priority
    return got / desired if desired > 0 else math.inf


def desired_replicas(
    queued_images: float,
    running_images: float,
    current_replicas: int,
    target_images_per_replica: float,
    *,
    upscale_smoothing: float = 1.0,
    downscale_smoothing: float = 1.0,
) -> float:
    """Replicas that would hold (queued + running) images at the target per replica.

    The smoothing factors move only that fraction of the way from
    `current_replicas` (as Ray Serve's upscaling/downscaling factors do): 1.0
    jumps straight to the target, below 1 damps oscillation.
    """
    if target_images_per_replica <= 0:
        raise ValueError(f"target_images_per_replica must be > 0, got {target_images_per_replica}")
    if queued_images < 0 or running_images < 0 or current_replicas < 0:
        raise ValueError(
            f"negative load: queued={queued_images}, running={running_images},"
            f" replicas={current_replicas}"
        )
    raw = (queued_images + running_images) / target_images_per_replica
    if raw >= current_replicas:
        return current_replicas + upscale_smoothing * (raw - current_replicas)
    return current_replicas - downscale_smoothing * (current_replicas - raw)
