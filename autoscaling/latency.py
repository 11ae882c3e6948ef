"""The latency model of one revision on one GPU type: from its load (request
rate, size mix, profile) and a replica count to the waits, p50 and p95 the
planner sizes against. Pure float math over queueing.py; no Ray, no I/O.

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

from .inputs import Profile, SizeMix, TierLoad
from .policies import NodeType
from .queueing import BulkQueue, ServiceDist, WaitTail, bulk_queue, solve_quantile


@dataclass(frozen=True, slots=True)
class Load:
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


def load_of(
    profile: Profile, node: NodeType, tiers: Sequence[TierLoad], mix: Sequence[SizeMix], *,
    overhead_s: float = 0.0, rate_rps: float | None = None,
) -> Load:
    """One revision's load on one GPU type: the tiers it serves (a tier without
    its own mix uses `mix`), at their summed rate or at `rate_rps`."""
    total = sum(t.rate_rps for t in tiers)
    entries = []
    for t in tiers:
        tier_mix = t.mix or mix
        share = t.rate_rps / total if total > 0 else 1.0 / len(tiers)
        weights = sum(m.weight for m in tier_mix)
        for m in tier_mix:
            work = m.images * m.megapixels * m.steps / profile.steps
            entries.append((share * m.weight / weights, m.images, work))
    probs, images, work = zip(*entries, strict=True)
    mean_work = sum(p * w for p, _, w in entries)
    return Load(
        rate=total if rate_rps is None else rate_rps,
        probs=probs, images=images, work=work, profile=profile,
        max_batch=profile.usable_batch(node),
        mean_images=sum(p * n for p, n, _ in entries),
        mean_work=mean_work,
        work_var=sum(p * (w - mean_work) ** 2 for p, _, w in entries),
        overhead=overhead_s,
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


def predict(load: Load, replicas: int) -> Performance:
    """Expected behaviour of `load` served by `replicas` replicas."""
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


def _batching(load: Load, replicas: int, k: float) -> BulkQueue:
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
    load: Load, chain: BulkQueue
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
