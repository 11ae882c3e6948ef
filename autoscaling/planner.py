"""Capacity planner: replicas, GPUs, nodes and cost for tiers of traffic, from
measured profiles and closed-form queueing. Pure: no Ray, no I/O.

The model of one revision on one GPU type:

* Work. A request of n images of M megapixels at s steps carries
  w = n M s / profile.steps. A batch of b images and total work W takes
  W * spmp(b) seconds (spmp interpolated between measured batch sizes, flat
  beyond), times a noise of mean 1 and CV service_cv.
* Batching. Continuous: a free replica takes up to K = max_batch / mean(n)
  queued requests; a request that finds a replica free starts alone. The
  queueing.bulk_queue chain gives the batch sizes for a given mean batch time m;
  m is its own fixed point (m = mean time over those sizes). K = 1 is M/M/c.
* Wait. The chain's law (none, or exponential), its rate scaled by
  2 / (1 + cs^2) for a batch-time CV cs (Allen-Cunneen).
* Latency. A request starts alone (no wait, its own work) or from the queue
  (wait, then its work plus b - 1 mean others, b size-biased); p50 and p95 of
  that mixture over the size mix, by bisection. One size, max batch 1 and
  service_cv 1 give M/M/c exactly.
* Headroom. Batches grow until replicas keep up, so a batching replica is busy
  ~100% of the time long before it saturates; utilisation is therefore demand
  over the throughput of full batches (the busy fraction is reported as `busy`).

Limits, measured against simulator.py: at the planned points of
tests/unit/test_simulator.py the p95 agrees within 10%. Away from them the model
is conservative by up to ~20% on one busy batching replica, and optimistic by a
third when exponential batch noise (cv 1) meets a wide size mix on two replicas
(a long batch also gathers a long queue: the independent wait + service law
misses that correlation). Serve routes to per-replica queues, not one shared
queue, so real waits run somewhat longer. Time is taken as linear in steps
(text encoding and VAE decoding are not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .budget import Demand, allocate
from .policies import NodeType  # the node types and caps of the policy's cluster
from .queueing import BulkQueue, ServiceDist, WaitTail, bulk_queue, solve_quantile


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
        memory = self.gpus_per_replica * node.gpu_memory_gb
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
                if node is None:
                    continue  # measured on a GPU this cluster does not have
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


# --- the model of one revision ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Load:
    """One revision's demand on one GPU type, reduced to what the formulas need."""

    rate: float  # requests/s
    probs: tuple[float, ...]  # per mix entry, summing to 1
    images: tuple[int, ...]
    work: tuple[float, ...]  # megapixel-steps at the profile's steps, per request
    profile: Profile
    max_batch: int  # images, memory-capped
    mean_images: float
    mean_work: float
    work_var: float
    overhead: float = 0.0  # seconds per request outside the pipeline

    def batch_seconds(self, requests: float) -> float:
        """Mean time of a batch of `requests` mean requests."""
        return self.profile.spmp(requests * self.mean_images) * requests * self.mean_work


def _load(inputs: PlanInputs, revision: str, gpu: str, rate_rps: float | None = None) -> _Load:
    profile = inputs.revisions[revision].profiles[gpu]
    tiers = [inputs.tiers[t] for t in tiers_by_revision(inputs)[revision]]
    total = sum(t.rate_rps for t in tiers)
    entries = []
    for t in tiers:
        mix = t.mix or inputs.mix
        share = t.rate_rps / total if total > 0 else 1.0 / len(tiers)
        weights = sum(m.weight for m in mix)
        for m in mix:
            work = m.images * m.megapixels * m.steps / profile.steps
            entries.append((share * m.weight / weights, m.images, work))
    probs, images, work = zip(*entries, strict=True)
    mean_work = sum(p * w for p, _, w in entries)
    return _Load(
        rate=total if rate_rps is None else rate_rps,
        probs=probs, images=images, work=work, profile=profile,
        max_batch=profile.usable_batch(inputs.nodes[gpu]),
        mean_images=sum(p * n for p, n, _ in entries),
        mean_work=mean_work,
        work_var=sum(p * (w - mean_work) ** 2 for p, _, w in entries),
        overhead=inputs.overhead_s,
    )


@dataclass(frozen=True, slots=True)
class Performance:
    """A revision's expected behaviour at one replica count (seconds, per second)."""

    replicas: int
    arrival_rps: float
    images_per_s: float
    utilisation: float  # demand / peak throughput (full batches): the headroom measure
    busy: float  # fraction of time a replica is running a batch
    mean_batch_images: float
    p_wait: float  # probability that a request queues at all
    mean_wait_s: float
    p95_wait_s: float
    mean_latency_s: float
    p50_s: float
    p95_s: float

    @property
    def stable(self) -> bool:
        return math.isfinite(self.p95_s)


def _performance(load: _Load, replicas: int) -> Performance:
    images_per_s = load.rate * load.mean_images
    k = max(1.0, load.max_batch / load.mean_images)
    # Batches grow until replicas keep up, so the busy fraction nears 1 well before
    # saturation; headroom is measured against the throughput of full batches.
    utilisation = load.rate * load.batch_seconds(k) / (k * replicas) if replicas else math.inf
    if replicas < 1 and load.rate == 0:  # no demand, no replicas: nothing to report
        return Performance(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    chain = _batching(load, replicas, k) if load.max_batch >= 1 and replicas >= 1 else None
    if chain is None or not chain.stable:
        return Performance(replicas, load.rate, images_per_s, utilisation, 1.0,
                           k * load.mean_images, 1.0, math.inf, math.inf, math.inf, math.inf,
                           math.inf)
    noise2 = load.profile.service_cv**2
    b = chain.mean_batch
    cs2 = (1.0 + load.work_var / (b * load.mean_work**2)) * (1.0 + noise2) - 1.0
    wait = WaitTail(chain.wait.p_wait, chain.wait.rate * 2.0 / (1.0 + cs2))
    alone, queued = _latency_parts(load, chain)
    pw = wait.p_wait

    def tail(t: float) -> float:
        return ((1.0 - pw) * sum(p * d.tail(t) for p, d in alone)
                + pw * sum(p * d.tail_after_wait(t, wait.rate) for p, d in queued))

    mean = (wait.mean + (1.0 - pw) * sum(p * d.mean for p, d in alone)
            + pw * sum(p * d.mean for p, d in queued))
    return Performance(
        replicas=replicas,
        arrival_rps=load.rate,
        images_per_s=images_per_s,
        utilisation=utilisation,
        busy=chain.busy / replicas,
        mean_batch_images=b * load.mean_images,
        p_wait=pw,
        mean_wait_s=wait.mean,
        p95_wait_s=wait.quantile(0.95),
        mean_latency_s=mean + load.overhead,
        p50_s=solve_quantile(tail, 0.50, mean) + load.overhead,
        p95_s=solve_quantile(tail, 0.95, mean) + load.overhead,
    )


def _batching(load: _Load, replicas: int, k: float) -> BulkQueue:
    """The bulk chain at its self-consistent service time m: the mean time of a
    batch over the batch sizes the chain at rate 1/m produces. (A slower batch
    lets more queue, so batches grow and take longer: the map is increasing and
    bisection between the lone and the full batch finds its fixed point.)"""

    def chain(m: float) -> BulkQueue:
        return bulk_queue(replicas, load.rate, 1.0 / m, k)

    def excess(m: float) -> float:
        q = chain(m)
        if not q.stable:
            return 1.0
        return sum(p * load.batch_seconds(b) for p, b in q.batch_sizes()) - m

    lo, hi = load.batch_seconds(1.0), load.batch_seconds(k)
    if k == 1 or load.rate == 0 or excess(lo) <= 0:
        return chain(lo)
    if excess(hi) >= 0:
        return chain(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if excess(mid) >= 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9 * hi:
            break
    return chain(0.5 * (lo + hi))


def _latency_parts(
    load: _Load, chain: BulkQueue
) -> tuple[list[tuple[float, ServiceDist]], list[tuple[float, ServiceDist]]]:
    """Service-time laws, weighted, of a request that starts alone (its own work)
    and of one taken from the queue (its work plus b - 1 others of mean work, b
    drawn from the request-weighted sizes of queued batches)."""
    cv = load.profile.service_cv
    entries = list(zip(load.probs, load.images, load.work, strict=True))
    alone = [(p, ServiceDist.fit(load.profile.spmp(n) * w, cv)) for p, n, w in entries]
    sizes = _coarse([(p * b, b) for p, b in chain.queued_sizes()])
    queued = []
    for pb, b in sizes:
        for p, n, w in entries:
            images = min(n + (b - 1.0) * load.mean_images, max(n, load.max_batch))
            total = w + (b - 1.0) * load.mean_work
            mix2 = (b - 1.0) * load.work_var / total**2  # the others' sizes vary too
            queued_cv = math.sqrt((1.0 + mix2) * (1.0 + cv * cv) - 1.0)
            queued.append((pb * p, ServiceDist.fit(load.profile.spmp(images) * total, queued_cv)))
    return alone, queued


def _coarse(sizes: list[tuple[float, float]], most: int = 12) -> list[tuple[float, float]]:
    """Normalised (probability, size) pairs, adjacent sizes merged into at most
    `most` groups: big batch limits would otherwise cost a term each per tail."""
    total = sum(p for p, _ in sizes)
    step = math.ceil(len(sizes) / most)
    out = []
    for i in range(0, len(sizes), step):
        group = sizes[i:i + step]
        mass = sum(p for p, _ in group)
        if mass > 0:
            out.append((mass / total, sum(p * b for p, b in group) / mass))
    return out


def _meets(perf: Performance, slo_s: float, target: float) -> bool:
    return perf.stable and perf.p95_s <= slo_s and perf.utilisation <= target


def _required(load: _Load, slo_s: float, target: float, lo: int, hi: int) -> int:
    """Smallest replica count in [lo, hi] meeting the SLO and the utilisation
    target (both improve with replicas). When even hi misses the SLO, replicas
    cannot buy it (the service alone is too slow): the target alone decides."""
    if load.rate == 0:
        return lo
    # Utilisation falls as 1/c, so this is the first count meeting the target.
    k = max(1.0, load.max_batch / load.mean_images)
    floor = max(lo, 1, math.ceil(load.rate * load.batch_seconds(k) / (k * target) - 1e-9))
    if floor >= hi or not _meets(_performance(load, hi), slo_s, target):
        return min(floor, hi)
    bad, good, step = floor - 1, hi, 1
    while bad + step < good:  # gallop: SLOs are usually met a few replicas above the floor
        if _meets(_performance(load, bad + step), slo_s, target):
            good = bad + step
            break
        bad, step = bad + step, step * 2
    while good - bad > 1:
        mid = (bad + good) // 2
        if _meets(_performance(load, mid), slo_s, target):
            good = mid
        else:
            bad = mid
    return good


def performance(
    inputs: PlanInputs, revision: str, replicas: int, *, gpu: str | None = None,
    rate_rps: float | None = None,
) -> Performance:
    """Expected behaviour of `revision` with `replicas` replicas on `gpu` (default:
    the planner's choice), at its tiers' rates or at `rate_rps` with the same mix."""
    gpu = gpu or _choose(inputs, revision)[0]
    return _performance(_load(inputs, revision, gpu, rate_rps), replicas)


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
        c = _required(load, slo, target, spec.min_replicas, spec.max_replicas)
        perf = _performance(load, c)
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
    revisions = {rev: _revision_plan(inputs, rev, gpu, chosen[rev][1], granted[rev])
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


def _revision_plan(inputs: PlanInputs, rev: str, gpu: str, required: int, granted: int) -> RevisionPlan:
    perf = _performance(_load(inputs, rev, gpu), granted)
    slo = revision_slo(inputs, rev)
    return RevisionPlan(
        revision=rev, gpu=gpu, priority=revision_priority(inputs, rev), slo_p95_s=slo,
        required_replicas=required, replicas=granted,
        gpus=granted * inputs.revisions[rev].profiles[gpu].gpus_per_replica, perf=perf,
        meets_slo=_meets(perf, slo, inputs.target_utilisation),
    )


def _tier_plan(name: str, tier: TierLoad, rev: RevisionPlan) -> TierPlan:
    # Tiers sharing a revision share its queue: one latency for all of them.
    return TierPlan(name, rev.revision, tier.priority, tier.rate_rps, tier.slo_p95_s,
                    rev.perf.p50_s, rev.perf.p95_s, rev.perf.p95_s <= tier.slo_p95_s)


def _pool_plan(gpu: str, node: NodeType, revisions: list[RevisionPlan]) -> PoolPlan:
    sizes = [r.gpus / r.replicas for r in revisions for _ in range(r.replicas)]
    nodes = _pack(sizes, node)
    used = sum(r.gpus for r in revisions)
    busy = sum(r.gpus * r.perf.busy for r in revisions)
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
