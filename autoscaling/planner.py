"""Capacity planner: replicas, GPUs, nodes and cost for tiers of traffic, from
measured profiles and closed-form queueing. Pure: no Ray, no I/O.

The inputs are the pydantic models of inputs.py. For each revision the planner takes,
on every GPU type it has a profile for, the fewest replicas whose latency
(latency.py: the model of one revision on one GPU type, and its limits) meets
the tightest SLO of its tiers and the utilisation target; it keeps the cheapest
GPU type, then packs replicas onto nodes under each type's cap, by priority.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .budget import Demand, allocate
from .inputs import PlanInputs, TierLoad
from .latency import Load, Performance, load_of, predict
from .policies import NodeType  # the node types and caps of the policy's cluster


def tiers_by_revision(inputs: PlanInputs) -> dict[str, list[str]]:
    """Revision -> the tiers it serves (sorted); unrouted revisions are left out."""
    out: dict[str, list[str]] = {}
    for tier in sorted(inputs.tiers):
        out.setdefault(inputs.tiers[tier].revision, []).append(tier)
    return out


def revision_priority(inputs: PlanInputs, revision: str) -> int:
    return max(inputs.tiers[t].priority for t in tiers_by_revision(inputs)[revision])


def revision_slo(inputs: PlanInputs, revision: str) -> float:
    return min(inputs.tiers[t].slo_p95_s for t in tiers_by_revision(inputs)[revision])


# --- GPU type and replicas per revision (the latency model: latency.py) ---------


def _load(inputs: PlanInputs, revision: str, gpu: str, rate_rps: float | None = None,
          slowdown: float = 1.0) -> Load:
    profile = inputs.revisions[revision].profiles[gpu]
    if slowdown != 1.0:
        profile = profile.model_copy(update={"seconds_per_megapixel": {
            b: t * slowdown for b, t in profile.seconds_per_megapixel.items()}})
    return load_of(profile, inputs.nodes[gpu],
                   [inputs.tiers[t] for t in tiers_by_revision(inputs)[revision]], inputs.mix,
                   overhead_s=inputs.overhead_s, rate_rps=rate_rps)


# --- shared cores (CPU nodes) ----------------------------------------------------


def contention(inputs: PlanInputs, gpu: str, replicas: dict[str, int],
               rates: dict[str, float] | None = None) -> dict[str, float]:
    """How much slower each revision's batches run on the shared-cores node type
    `gpu`, with `replicas` of each revision placed there, at its tiers' rates (or
    `rates`): 1 on a node type that hands out whole accelerators.

    Over the pool's cores C: while a replica of r runs a batch it wants t_r
    threads; each other replica q is running (independently) with its busy
    fraction and then wants t_q; the stack wants `cpu_per_request_s` per request,
    spread evenly. A batch runs at C / (everything wanted) of its quiet speed
    whenever that exceeds the cores: the slowdown is the expectation of that over
    which others are running. Busy fractions grow with the slowdown (and batches
    with them), so the slowdowns are a fixed point, found by damped iteration."""
    node = inputs.nodes[gpu]
    placed = {r: c for r, c in replicas.items() if c > 0}
    if not node.shared_cores or not placed:
        return {r: 1.0 for r in replicas}
    rates = rates or {}
    threads = {r: inputs.revisions[r].profiles[gpu].threads
               or inputs.revisions[r].profiles[gpu].gpus_per_replica for r in placed}
    sizes = [inputs.revisions[r].profiles[gpu].gpus_per_replica
             for r, c in placed.items() for _ in range(c)]
    cores = node.gpus_per_node * max(1, _pack(sizes, node))
    rate = sum(_load(inputs, r, gpu, rates.get(r)).rate for r in placed)
    stack = node.cpu_per_request_s * rate
    slow = {r: 1.0 for r in placed}
    for _ in range(200):
        busy = {}
        for r, count in placed.items():
            perf = predict(_load(inputs, r, gpu, rates.get(r), slow[r]), count)
            busy[r] = perf.busy if perf.stable else 1.0
        new = {r: expected_slowdown(threads[r] + stack, cores, [
            (placed[q] - (q == r), busy[q], threads[q]) for q in placed]) for r in placed}
        if all(abs(new[r] - slow[r]) < 1e-4 * slow[r] for r in placed):
            slow = new
            break
        slow = {r: 0.5 * (slow[r] + new[r]) for r in placed}
    return {r: slow.get(r, 1.0) for r in replicas}


def expected_slowdown(base: float, cores: float,
                       groups: list[tuple[int, float, float]]) -> float:
    """E[max(1, (base + threads of the running others) / cores)], `groups` being
    (replicas, busy fraction, threads) with each replica running independently."""
    dist = {0.0: 1.0}  # threads wanted by the others -> probability
    for n, b, t in groups:
        step: dict[float, float] = {}
        for k in range(n + 1):
            pk = math.comb(n, k) * b**k * (1.0 - b) ** (n - k)
            for want, p in dist.items():
                step[want + k * t] = step.get(want + k * t, 0.0) + p * pk
        dist = step
    return sum(p * max(1.0, (base + want) / cores) for want, p in dist.items())


def _predict(inputs: PlanInputs, revision: str, gpu: str, replicas: int,
             others: dict[str, int] | None = None, rate_rps: float | None = None
             ) -> Performance:
    """predict() with the slowdown of shared cores: `others` are the replicas of the
    other revisions on the same node type (at their tiers' rates)."""
    pool = {**(others or {}), revision: replicas}
    slow = contention(inputs, gpu, pool, {revision: rate_rps} if rate_rps is not None
                      else None)[revision]
    return predict(_load(inputs, revision, gpu, rate_rps, slow), replicas)


def _meets(perf: Performance, slo_s: float, target: float) -> bool:
    return perf.stable and perf.p95_s <= slo_s and perf.utilisation <= target


def _required(load: Load, slo_s: float, target: float, lo: int, hi: int,
              perf: Callable[[int], Performance] | None = None) -> int:
    """Smallest replica count in [lo, hi] meeting the SLO and the utilisation
    target (both improve with replicas). When even hi misses the SLO, replicas
    cannot buy it (the service alone is too slow): the target alone decides.
    `perf(c)`: the performance at c replicas (default predict(load, c))."""
    if load.rate == 0:
        return lo
    if perf is None:
        def perf(c: int) -> Performance:
            return predict(load, c)
    # Utilisation falls as 1/c, so this is the first count meeting the target.
    k = max(1.0, load.max_batch / load.mean_images)
    floor = max(lo, 1, math.ceil(load.rate * load.batch_seconds(k) / (k * target) - 1e-9))
    if floor >= hi or not _meets(perf(hi), slo_s, target):
        return min(floor, hi)
    bad, good, step = floor - 1, hi, 1
    while bad + step < good:  # gallop: SLOs are usually met a few replicas above the floor
        if _meets(perf(bad + step), slo_s, target):
            good = bad + step
            break
        bad, step = bad + step, step * 2
    while good - bad > 1:
        mid = (bad + good) // 2
        if _meets(perf(mid), slo_s, target):
            good = mid
        else:
            bad = mid
    return good


def performance(
    inputs: PlanInputs, revision: str, replicas: int, *, gpu: str | None = None,
    rate_rps: float | None = None, others: dict[str, int] | None = None,
) -> Performance:
    """Expected behaviour of `revision` with `replicas` replicas on `gpu` (default:
    the planner's choice), at its tiers' rates or at `rate_rps` with the same mix;
    `others`: replicas of other revisions sharing its cores (shared-cores nodes)."""
    gpu = gpu or _choose(inputs, revision)[0]
    return _predict(inputs, revision, gpu, replicas, others, rate_rps)


def _choose(inputs: PlanInputs, revision: str) -> tuple[str, int]:
    """GPU type and replica count: the cheapest per hour that meets the SLO;
    when none does, the one with the best p95 at its count."""
    spec = inputs.revisions[revision]
    slo, target = revision_slo(inputs, revision), inputs.target_utilisation
    best = None
    for gpu in sorted(set(spec.profiles) & set(inputs.nodes)):
        load = _load(inputs, revision, gpu)
        if load.max_batch < 1:
            continue  # the model does not fit this GPU's memory
        def perf_at(c: int, gpu: str = gpu) -> Performance:
            return _predict(inputs, revision, gpu, c)

        c = _required(load, slo, target, spec.min_replicas, spec.max_replicas, perf_at)
        perf = perf_at(c)
        node = inputs.nodes[gpu]
        cost = c * spec.profiles[gpu].gpus_per_replica * node.cost_per_hour / node.gpus_per_node
        key = (0, cost) if _meets(perf, slo, target) else (1, perf.p95_s)
        if best is None or key < best[0]:
            best = (key, gpu, c)
    if best is None:
        raise ValueError(f"revision {revision!r} fits the memory of none of its GPU types")
    return best[1], best[2]


# --- the plan -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RevisionPlan:
    revision: str
    gpu: str
    priority: int
    slo_p95_s: float  # the tightest SLO of its tiers
    required_replicas: int  # to meet SLO and target with no cap
    replicas: int  # granted under the cap
    gpus: float
    perf: Performance
    meets_slo: bool
    threads: float = 1.0  # cores a running replica keeps busy (GPUs: gpus per replica)
    slowdown: float = 1.0  # of its batches by shared cores (1: whole accelerators)


@dataclass(frozen=True, slots=True)
class TierPlan:
    tier: str
    revision: str
    priority: int
    rate_rps: float
    slo_p95_s: float
    p50_s: float
    p95_s: float
    meets_slo: bool


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """One GPU type's nodes. Spare counts are headroom under the cap."""

    gpu: str
    nodes: int
    max_nodes: int
    gpus_used: float
    gpus_provisioned: int
    gpu_utilisation: float  # busy GPU time / provisioned GPUs
    cost_per_hour: float
    spare_nodes: int
    spare_gpus: float


@dataclass(frozen=True, slots=True)
class Plan:
    revisions: dict[str, RevisionPlan]
    tiers: dict[str, TierPlan]
    pools: dict[str, PoolPlan]
    fits_cap: bool  # every revision got its required replicas
    slo_misses: tuple[str, ...]  # tiers whose p95 misses their SLO

    @property
    def nodes(self) -> int:
        return sum(p.nodes for p in self.pools.values())

    @property
    def gpus(self) -> float:
        return sum(p.gpus_used for p in self.pools.values())

    @property
    def cost_per_hour(self) -> float:
        return sum(p.cost_per_hour for p in self.pools.values())

    @property
    def cost_per_image(self) -> float:
        """Cost per hour over the images per hour the planned replicas serve."""
        images = sum(r.perf.images_per_s for r in self.revisions.values() if r.replicas) * 3600
        return self.cost_per_hour / images if images > 0 else math.inf

    @property
    def gpu_utilisation(self) -> float:
        provisioned = sum(p.gpus_provisioned for p in self.pools.values())
        busy = sum(p.gpu_utilisation * p.gpus_provisioned for p in self.pools.values())
        return busy / provisioned if provisioned else 0.0

    @property
    def spare_nodes(self) -> int:
        return sum(p.spare_nodes for p in self.pools.values())

    @property
    def spare_gpus(self) -> float:
        return sum(p.spare_gpus for p in self.pools.values())


def plan(inputs: PlanInputs) -> Plan:
    """Replicas per revision (smallest count meeting SLO and utilisation target,
    within min/max), GPU type per revision (cheapest), nodes per GPU type. When
    the node caps cannot hold it all, GPUs go by priority (budget.allocate) and
    the tiers left short are named in `slo_misses`."""
    chosen = {rev: _choose(inputs, rev) for rev in tiers_by_revision(inputs)}
    granted: dict[str, int] = {}
    for gpu, node in inputs.nodes.items():
        members = {rev: c for rev, (g, c) in chosen.items() if g == gpu}
        granted |= _grant(inputs, gpu, node, members)
    slow = {}
    for gpu in inputs.nodes:
        slow |= contention(inputs, gpu, {r: granted[r] for r, (g, _) in chosen.items()
                                         if g == gpu})
    revisions = {rev: _revision_plan(inputs, rev, gpu, chosen[rev][1], granted[rev], slow[rev])
                 for rev, (gpu, _) in chosen.items()}
    tiers = {name: _tier_plan(name, t, revisions[t.revision])
             for name, t in sorted(inputs.tiers.items())}
    pools = {gpu: _pool_plan(gpu, node, [r for r in revisions.values() if r.gpu == gpu])
             for gpu, node in sorted(inputs.nodes.items())}
    return Plan(
        revisions=revisions,
        tiers=tiers,
        pools=pools,
        fits_cap=all(r.replicas >= r.required_replicas for r in revisions.values()),
        slo_misses=tuple(t for t, p in tiers.items() if not p.meets_slo),
    )


def _grant(inputs: PlanInputs, gpu: str, node: NodeType, required: dict[str, int]) -> dict[str, int]:
    """Replicas per revision on one GPU type, within its node cap."""
    def size(rev: str) -> float:
        return inputs.revisions[rev].profiles[gpu].gpus_per_replica

    demands = [
        Demand(rev, revision_priority(inputs, rev), size(rev), inputs.revisions[rev].min_replicas,
               inputs.revisions[rev].max_replicas, float(c))
        for rev, c in required.items()
    ]
    got = allocate(demands, node.max_nodes * node.gpus_per_node)
    # Replica sizes that do not tile each other can strand GPUs on a node, so the
    # GPU budget may still need more nodes than the cap: shed lowest priority first.
    shed = sorted(demands, key=lambda d: (d.priority, d.name))
    while _pack([size(r) for r, n in got.items() for _ in range(n)], node) > node.max_nodes:
        victim = next(d for d in shed if got[d.name] > 0)
        got[victim.name] -= 1
    return got


def _pack(sizes: list[float], node: NodeType) -> int:
    """Nodes for replicas of these GPU sizes: first fit decreasing."""
    free: list[float] = []
    for s in sorted(sizes, reverse=True):
        for i, f in enumerate(free):
            if s <= f + 1e-9:
                free[i] -= s
                break
        else:
            free.append(node.gpus_per_node - s)
    return len(free)


def _revision_plan(inputs: PlanInputs, rev: str, gpu: str, required: int, granted: int,
                   slowdown: float = 1.0) -> RevisionPlan:
    perf = predict(_load(inputs, rev, gpu, slowdown=slowdown), granted)
    slo = revision_slo(inputs, rev)
    profile = inputs.revisions[rev].profiles[gpu]
    return RevisionPlan(
        revision=rev, gpu=gpu, priority=revision_priority(inputs, rev), slo_p95_s=slo,
        required_replicas=required, replicas=granted,
        gpus=granted * profile.gpus_per_replica, perf=perf,
        meets_slo=_meets(perf, slo, inputs.target_utilisation),
        threads=profile.threads or profile.gpus_per_replica, slowdown=slowdown,
    )


def _tier_plan(name: str, tier: TierLoad, rev: RevisionPlan) -> TierPlan:
    # Tiers sharing a revision share its queue: one latency for all of them.
    return TierPlan(name, rev.revision, tier.priority, tier.rate_rps, tier.slo_p95_s,
                    rev.perf.p50_s, rev.perf.p95_s, rev.perf.p95_s <= tier.slo_p95_s)


def _pool_plan(gpu: str, node: NodeType, revisions: list[RevisionPlan]) -> PoolPlan:
    sizes = [r.gpus / r.replicas for r in revisions for _ in range(r.replicas)]
    nodes = _pack(sizes, node)
    used = sum(r.gpus for r in revisions)
    busy = sum(r.threads * r.replicas * r.perf.busy for r in revisions)  # accelerators
    if node.shared_cores:
        busy = min(busy, nodes * node.gpus_per_node)  # cores: past them, batches slow down
    provisioned = nodes * node.gpus_per_node
    return PoolPlan(
        gpu=gpu, nodes=nodes, max_nodes=node.max_nodes, gpus_used=used,
        gpus_provisioned=provisioned,
        gpu_utilisation=busy / provisioned if provisioned else 0.0,
        cost_per_hour=nodes * node.cost_per_hour,
        spare_nodes=node.max_nodes - nodes,
        spare_gpus=node.max_nodes * node.gpus_per_node - used,
    )


# --- sweeps (for the plots) ---------------------------------------------------------


def sweep_load(
    inputs: PlanInputs, revision: str, rates_rps: Sequence[float], *,
    replicas: int | None = None, gpu: str | None = None,
) -> list[Performance]:
    """Latency against load for a fixed pool (default: the planned one)."""
    if replicas is None or gpu is None:
        planned = plan(inputs).revisions[revision]
        replicas = planned.replicas if replicas is None else replicas
        gpu = gpu or planned.gpu
    return [performance(inputs, revision, replicas, gpu=gpu, rate_rps=r) for r in rates_rps]


@dataclass(frozen=True, slots=True)
class SloPoint:
    slo_p95_s: float
    cost_per_hour: float
    nodes: int
    gpus: float
    fits_cap: bool
    slo_misses: tuple[str, ...]


def sweep_slo(
    inputs: PlanInputs, slos_s: Sequence[float], tiers: Sequence[str] | None = None
) -> list[SloPoint]:
    """Cost against SLO: re-plan with the p95 SLO of `tiers` (default all) set to
    each value in turn."""
    names = list(inputs.tiers) if tiers is None else list(tiers)
    points = []
    for slo in slos_s:
        changed = {n: t.model_copy(update={"slo_p95_s": slo}) if n in names else t
                   for n, t in inputs.tiers.items()}
        p = plan(inputs.model_copy(update={"tiers": changed}))
        points.append(SloPoint(slo, p.cost_per_hour, p.nodes, p.gpus, p.fits_cap, p.slo_misses))
    return points
