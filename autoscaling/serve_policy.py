"""The shared GPU budget as a Ray Serve application-level autoscaling policy.

Ray Serve 2.60 calls an application's policy with every autoscaled deployment's
AutoscalingContext at once, so one decision divides the GPUs. Per deployment the
queue pressure (queued + running images, from the replica's
`record_autoscaling_stats`) becomes desired replicas; `budget.allocate` splits the
budget by priority; then `decide` holds every step under the cap: a replica holds
its GPUs until Serve has stopped it (after downscale_delay_s, then up to its
graceful shutdown), so an upscale only takes GPUs that no deployment's target,
running replica or stopping replica still holds.

Deploy it through the Serve config (RayService serveConfigV2 or `serve deploy`):
`serve_config()` writes the application entry with the policy and its kwargs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .budget import Demand, allocate, desired_replicas

log = logging.getLogger("imagegen.autoscaling")
POLICY_FUNCTION = "autoscaling.serve_policy:BudgetPolicy"


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What the decision needs of one autoscaled deployment, this tick."""

    name: str
    gpu_type: str
    gpus_per_replica: float
    priority: int
    min_replicas: int
    max_replicas: int
    held: int  # replicas holding GPUs: max(target, running + stopping)
    images: float  # queued + running images in its replicas
    target_images: float  # images per replica it aims for
    target: int = -1  # Serve's current target replicas (-1: same as held)

    @property
    def current_target(self) -> int:
        return self.held if self.target < 0 else self.target


def decide(states: list[DeploymentState], budget: Mapping[str, float]) -> dict[str, int]:
    """New target replicas per deployment. Pure.

    GPUs asked for never exceed the budget of a GPU type once the mins fit: a
    target at or below the current one asks nothing new (and frees nothing until
    Serve has stopped the replicas); any step above the current target, by
    priority, must fit in what no target, running or stopping replica holds.
    """
    out: dict[str, int] = {}
    by_type: dict[str, list[DeploymentState]] = {}
    for s in states:
        by_type.setdefault(s.gpu_type, []).append(s)
    for gpu_type, group in by_type.items():
        cap = budget.get(gpu_type, 0.0)
        fair = allocate([
            Demand(s.name, s.priority, s.gpus_per_replica, s.min_replicas, s.max_replicas,
                   desired_replicas(s.images, 0, s.current_target, s.target_images))
            for s in group
        ], cap)
        free = cap - sum(s.held * s.gpus_per_replica for s in group)
        for s in sorted(group, key=lambda s: (-s.priority, s.name)):
            want, now = fair[s.name], s.current_target
            if want <= now:
                out[s.name] = want
                continue
            room = math.floor((free + 1e-9) / s.gpus_per_replica) if s.gpus_per_replica else want
            grant = max(0, min(want - now, room))
            out[s.name] = now + grant
            free -= grant * s.gpus_per_replica
    return out


class BudgetPolicy:
    """Serve's application-level policy (a class, so Serve passes it `policy_kwargs`).

    `budget`: GPU type -> GPUs (node cap x GPUs per node). `deployments`: deployment
    name -> {gpu_type, gpus, priority, target_images}. Deployments not named (the
    ingress) keep Serve's own decision. `release_s`: how long a replica that left
    the running set may still hold its GPUs while it stops (Serve's
    graceful_shutdown_timeout_s, 20 s by default); Serve's context does not show
    stopping replicas, so the policy remembers them.
    """

    def __init__(self, budget: dict[str, float], deployments: dict[str, dict[str, Any]],
                 release_s: float = 20.0, clock=time.monotonic):
        self.budget = budget
        self.deployments = deployments
        self.release_s = release_s
        self.clock = clock
        self._last_running: dict[str, int] = {}
        self._stopping: dict[str, list[tuple[float, int]]] = {}

    def _stopping_now(self, name: str, running: int) -> int:
        now = self.clock()
        last = self._last_running.get(name, running)
        self._last_running[name] = running
        recent = [(t, n) for t, n in self._stopping.get(name, []) if now - t < self.release_s]
        if running < last:
            recent.append((now, last - running))
        self._stopping[name] = recent
        return sum(n for _, n in recent)

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        states, ids = [], {}
        for dep_id, ctx in contexts.items():
            spec = self.deployments.get(dep_id.name)
            if spec is None:
                continue
            ids[dep_id.name] = dep_id
            stopping = self._stopping_now(dep_id.name, ctx.current_num_replicas)
            states.append(DeploymentState(
                name=dep_id.name, gpu_type=spec["gpu_type"], gpus_per_replica=spec["gpus"],
                priority=spec["priority"], min_replicas=ctx.capacity_adjusted_min_replicas,
                max_replicas=ctx.capacity_adjusted_max_replicas,
                held=max(ctx.target_num_replicas, ctx.current_num_replicas + stopping),
                images=_images(ctx), target_images=spec["target_images"],
                target=ctx.target_num_replicas,
            ))
        decisions = decide(states, self.budget)
        changed = {n: (s.target, decisions[n]) for s in states
                   if decisions[(n := s.name)] != s.target}
        if changed:
            log.info("budget policy: %s", changed)
        return {ids[n]: r for n, r in decisions.items()}, {}


def _images(ctx) -> float:
    """Queued + running images across the deployment's replicas (their
    record_autoscaling_stats); before any report, Serve's own request count."""
    metrics = ctx.aggregated_metrics or {}
    queued = metrics.get("queued_images", {})
    running = metrics.get("running_images", {})
    if queued or running:
        return float(sum(queued.values()) + sum(running.values()))
    return float(ctx.total_num_requests)


def serve_config(
    policy, lock, routing, *, args: dict[str, Any] | None = None, name: str = "imagegen",
) -> dict[str, Any]:
    """The Serve config application entry for `serve.app:build_app`, with the
    budget policy when `policy.cluster.budget_policy` is set."""
    app: dict[str, Any] = {"name": name, "import_path": "serve.app:build_app",
                           "route_prefix": "/", "args": args or {}}
    if not policy.cluster.budget_policy:
        return app
    deployments, budget, fixed = {}, {}, {}
    for model, entry in lock.models.items():
        p = policy.for_model(model)
        if p.num_gpus == 0:
            continue
        if p.autoscaling.min_replicas == p.autoscaling.max_replicas:
            # not autoscaled: its GPUs are taken before the policy divides the rest
            fixed[p.gpu_type] = fixed.get(p.gpu_type, 0.0) + p.num_gpus * p.autoscaling.max_replicas
            continue
        # A fallback gets the priority of the tiers it backs: under the cap it must
        # not starve just when a switch sends a tier to it.
        tiers = routing.backed_by(model)
        deployments[entry.deployment_name] = {
            "gpu_type": p.gpu_type, "gpus": p.num_gpus,
            "priority": max((policy.cluster.priorities.get(t, 0) for t in tiers), default=0),
            # one batch running and one queued behind it
            "target_images": 2 * p.batching.max_batch_images,
        }
        budget[p.gpu_type] = float(policy.cluster.gpu_budget(p.gpu_type))
    budget = {t: max(0.0, b - fixed.get(t, 0.0)) for t, b in budget.items()}
    app["autoscaling_policy"] = {"policy_function": POLICY_FUNCTION,
                                 "policy_kwargs": {"budget": budget, "deployments": deployments}}
    return app
