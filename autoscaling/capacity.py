"""`imagegen capacity check`: does the autoscaling policy fit under the hard node
cap? Pure: the policy, the models it deploys and their vRAM in, findings out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import inputs
from .policies import NodeType, Policy


@dataclass(frozen=True, slots=True)
class GpuDemand:
    gpu_type: str
    cap_gpus: int
    min_gpus: float
    max_gpus: float
    by_model: dict[str, float]  # model -> its max GPU demand


@dataclass
class CheckResult:
    demands: list[GpuDemand]
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check(policy: Policy, vram_gb: Mapping[str, float], tiers: Mapping[str, str]) -> CheckResult:
    """`vram_gb`: model -> vRAM per replica (models.lock); `tiers`: tier -> model."""
    cluster = policy.cluster
    per_type: dict[str, dict[str, tuple[float, float]]] = {}
    errors: list[str] = []
    notes: list[str] = []
    for model, need in sorted(vram_gb.items()):
        p = policy.for_model(model)
        if p.num_gpus == 0:
            continue
        node = cluster.node_types[p.gpu_type]  # validated by Policy
        scaling = p.autoscaling
        per_type.setdefault(p.gpu_type, {})[model] = (
            scaling.min_replicas * p.num_gpus, scaling.max_replicas * p.num_gpus
        )
        if p.num_gpus > node.gpus_per_node:
            errors.append(f"{model}: {p.num_gpus} GPUs per replica exceed a "
                          f"{node.gpus_per_node}-GPU {p.gpu_type} node")
        elif p.num_gpus < 1 and not math.isclose(1 / p.num_gpus, round(1 / p.num_gpus)):
            notes.append(f"{model}: {p.num_gpus} GPU per replica does not divide a GPU; "
                         f"{math.floor(1 / p.num_gpus)} replicas share one")
        memory = p.num_gpus * node.gpu_memory_gb
        if need > memory:
            errors.append(f"{model}: needs {need} GB vRAM, {p.num_gpus} x {p.gpu_type} "
                          f"gives {memory:g} GB")
    demands = []
    for gpu_type, models in sorted(per_type.items()):
        cap = cluster.gpu_budget(gpu_type)
        lo = sum(m[0] for m in models.values())
        hi = sum(m[1] for m in models.values())
        demands.append(GpuDemand(gpu_type, cap, lo, hi, {k: v[1] for k, v in models.items()}))
        if lo > cap:
            errors.append(f"{gpu_type}: the minimum replicas alone need {lo:g} GPUs, the cap "
                          f"is {cap} ({cluster.node_types[gpu_type].max_nodes} nodes)")
        elif hi > cap:
            top = ", ".join(f"{m} {g[1]:g}" for m, g in sorted(models.items(),
                                                                key=lambda x: -x[1][1]))
            msg = (f"{gpu_type}: summed max demand {hi:g} GPUs exceeds the cap of {cap} "
                   f"by {hi - cap:g} (max GPUs: {top})")
            if cluster.budget_policy:
                notes.append(msg + "; the shared budget policy holds it to the cap")
                cold = sorted(m for m in models if policy.for_model(m).autoscaling.min_replicas
                              == 0)
                if cold:
                    # Serve's cold-start path scales 0 -> 1 before any policy runs.
                    notes.append(f"{gpu_type}: {', '.join(cold)} may scale from 0 to 1 "
                                 "replica outside the budget policy (Serve's cold start); "
                                 "keep a GPU of headroom or min_replicas >= 1")
            else:
                errors.append(msg + "; lower max_replicas or set cluster.budget_policy")
    unranked = sorted(t for t in tiers if t not in cluster.priorities)
    if unranked and per_type:
        errors.append(f"tiers without a priority in cluster.priorities: {', '.join(unranked)}")
    return CheckResult(demands, errors, notes)


# --- planner inputs from the policy, the lock's profiles and the routing ------------


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the planner needs of one model: its default request and its profiles."""

    width: int
    height: int
    steps: int
    # accelerator type -> measured profile (serve.lockfile.Profile: steps,
    # seconds_per_megapixel, peak_memory_gb)
    profiles: Mapping[str, Any]

    @classmethod
    def of_lock(cls, models: Mapping[str, Any]) -> dict[str, ModelFacts]:
        """From models.lock entries (serve.lockfile.ModelEntry): their defaults and
        profiles."""
        return {n: cls(e.defaults.width, e.defaults.height, e.defaults.steps, e.profiles)
                for n, e in models.items()}


def trace_load(arrivals, steps: Mapping[str, int]) -> tuple[dict[str, float],
                                                             dict[str, list[inputs.SizeMix]]]:
    """Rates (requests/s over the trace's span) and size mixes per tier from a
    trace's arrivals (simulator.Arrival); `steps`: tier -> steps when a row has none."""
    if not arrivals:
        raise ValueError("the trace has no requests")
    span = max(a.time_s for a in arrivals) - min(a.time_s for a in arrivals)
    if span <= 0:
        raise ValueError("the trace spans no time: rates are undefined")
    counts: dict[str, dict[tuple[int, int, int, int], int]] = {}
    for a in arrivals:
        shape = (a.width, a.height, a.n, a.steps or steps.get(a.tier, 1))
        tier = counts.setdefault(a.tier, {})
        tier[shape] = tier.get(shape, 0) + 1
    rates = {t: sum(c.values()) / span for t, c in counts.items()}
    mixes = {t: [inputs.SizeMix(weight=k, width=w, height=h, images=n, steps=st)
                 for (w, h, n, st), k in sorted(c.items())] for t, c in counts.items()}
    return rates, mixes


def plan_inputs(
    policy: Policy, models: Mapping[str, ModelFacts], routes: Mapping[str, str],
    rates: Mapping[str, float], slos: Mapping[str, float], *, service_cv: float = 0.1,
    target_utilisation: float = 0.85, overhead_s: float = 0.0,
    mixes: Mapping[str, list[inputs.SizeMix]] | None = None,
) -> inputs.PlanInputs:
    """PlanInputs for the tiers in `rates` (tier -> model from `routes`). A tier's
    requests follow `mixes[tier]` (from a trace), else its model's default size and
    steps, one image each."""
    nodes = dict(policy.cluster.node_types)
    if not nodes:
        raise ValueError("the policy has no cluster.node_types: nothing to plan GPUs for")
    tiers, revisions = {}, {}
    for tier, rate in rates.items():
        model = routes.get(tier)
        if model is None:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(sorted(routes))}")
        if model not in models:
            raise ValueError(f"tier {tier!r}: model {model!r} is neither in models.lock nor "
                             "in a --profiles file")
        if tier not in slos:
            raise ValueError(f"tier {tier!r} has no SLO")
        facts, p = models[model], policy.for_model(model)
        usable = {key: prof for key, prof in facts.profiles.items() if key in nodes}
        if not usable:
            raise ValueError(f"model {model} has no profile for {sorted(nodes)} "
                             f"(has {sorted(facts.profiles)}); run `imagegen capacity profile`")
        revisions[model] = inputs.RevisionSpec(
            profiles={key: inputs.Profile(
                steps=prof.steps,
                seconds_per_megapixel=prof.seconds_per_megapixel,
                peak_memory_gb={b: max(g, 1e-3) for b, g in prof.peak_memory_gb.items()},
                gpus_per_replica=_accelerators(p, nodes[key]),
                max_batch_images=p.batching.max_batch_images,
                service_cv=service_cv,
                threads=_threads(p, nodes[key]),
            ) for key, prof in usable.items()},
            min_replicas=p.autoscaling.min_replicas, max_replicas=p.autoscaling.max_replicas,
        )
        tiers[tier] = inputs.TierLoad(
            revision=model, rate_rps=rate, priority=policy.cluster.priorities.get(tier, 0),
            slo_p95_s=slos[tier],
            mix=(mixes or {}).get(tier) or [
                inputs.SizeMix(weight=1, width=facts.width, height=facts.height, images=1,
                                steps=facts.steps)],
        )
    first = next(iter(tiers.values())).mix
    return inputs.PlanInputs(tiers=tiers, revisions=revisions, nodes=nodes, mix=first,
                              target_utilisation=target_utilisation, overhead_s=overhead_s)


def _accelerators(p, node: NodeType) -> float:
    """GPUs per replica. A CPU replica (num_gpus 0) takes cpu_threads cores, or on a
    shared-cores node its num_cpus, which is what Ray places it by."""
    if p.num_gpus:
        return p.num_gpus
    if node.shared_cores:
        return p.num_cpus or 1e-3  # a 0-CPU replica still runs somewhere
    return min(p.cpu_threads or node.gpus_per_node, node.gpus_per_node)


def _threads(p, node: NodeType) -> float | None:
    """Cores a running batch of a CPU replica on a shared-cores node keeps busy."""
    if p.num_gpus or not node.shared_cores:
        return None
    return min(p.cpu_threads or node.gpus_per_node, node.gpus_per_node)
