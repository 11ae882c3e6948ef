"""Discrete-event simulation (simpy) of the serving pools: arrivals from a trace
or Poisson, continuous batching per replica, and an optional autoscaler under
the shared GPU budget. It checks the planner's closed forms and shows what the
closed forms leave out: cold starts, scaling delays, queue limits.

Same model of work as the planner (inputs.Profile): a batch of b images with
total work W takes W * spmp(b) seconds times a Gamma noise of mean 1 and CV
service_cv. One shared FIFO queue per revision; a free replica takes queued
requests up to max_batch images (a request is never split; one heavier than the
limit runs alone). Deterministic for a given seed.

Fast enough for hours of traffic: one simpy event per arrival and per batch, no
process per request, noise drawn in advance.
"""

from __future__ import annotations

import csv
import json
import math
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import simpy
from pydantic import BaseModel, ConfigDict, Field

from .budget import Demand, allocate, desired_replicas
from .inputs import PlanInputs, Profile
from .planner import Plan, revision_priority, tiers_by_revision

# request status codes
_PENDING, _DONE, _DROPPED, _TIMED_OUT = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a trace. steps None: the profile's measured steps."""

    time_s: float
    tier: str
    width: int
    height: int
    n: int
    steps: int | None = None


def load_trace(path: str | Path) -> list[Arrival]:
    """Arrivals from CSV (header row) or JSONL (one object per line), by suffix:
    columns time_s, tier, width, height, n and optionally steps. Sorted by time."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".csv":
        rows: Iterable[tuple[int, dict[str, Any]]] = enumerate(csv.DictReader(text.splitlines()), 2)
    elif path.suffix in (".jsonl", ".ndjson"):
        rows = ((i, json.loads(line)) for i, line in enumerate(text.splitlines(), 1)
                if line.strip())
    else:
        raise ValueError(f"{path}: unknown trace format {path.suffix!r} (want .csv or .jsonl)")
    arrivals = []
    for line, row in rows:
        try:
            arrivals.append(_arrival(row))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{line}: bad trace row {row!r}: {e}") from None
    return sorted(arrivals, key=lambda a: a.time_s)


def _arrival(row: dict[str, Any]) -> Arrival:
    extra = set(row) - {"time_s", "tier", "width", "height", "n", "steps"}
    if extra:
        raise ValueError(f"unknown columns {sorted(extra)}")
    steps = row.get("steps")
    a = Arrival(float(row["time_s"]), str(row["tier"]), int(row["width"]), int(row["height"]),
                int(row["n"]), None if steps in (None, "") else int(steps))
    if not (a.time_s >= 0 and a.width >= 1 and a.height >= 1 and a.n >= 1):
        raise ValueError("need time_s >= 0 and width, height, n >= 1")
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"steps {a.steps} < 1")
    return a


def poisson_arrivals(inputs: PlanInputs, duration_s: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at each tier's rate over [0, duration_s), sizes drawn from
    the tier's mix (or the global one)."""
    rng = np.random.default_rng(seed)
    out: list[Arrival] = []
    for name in sorted(inputs.tiers):
        tier = inputs.tiers[name]
        mix = tier.mix or inputs.mix
        count = rng.poisson(tier.rate_rps * duration_s)
        times = rng.uniform(0.0, duration_s, count)
        weights = np.array([m.weight for m in mix])
        picks = rng.choice(len(mix), size=count, p=weights / weights.sum())
        out += [Arrival(float(t), name, mix[i].width, mix[i].height, mix[i].images, mix[i].steps)
                for t, i in zip(times, picks, strict=True)]
    return sorted(out, key=lambda a: a.time_s)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalerConfig(_Strict):
    interval_s: Annotated[float, Field(gt=0)] = Field(10.0, description="decision period")
    target_images_per_replica: Annotated[float, Field(gt=0)] = Field(
        8.0, description="queued + running images a replica should hold"
    )
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        30.0, description="how long scale-up must be wanted before it happens"
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        600.0, description="how long scale-down must be wanted (not when the budget forces it)"
    )
    cold_start_s: Annotated[float, Field(ge=0)] = Field(
        60.0, description="from launch (GPUs held) to serving"
    )


class SimConfig(_Strict):
    duration_s: Annotated[float, Field(gt=0)] = Field(description="arrivals in [0, duration)")
    warmup_s: Annotated[float, Field(ge=0)] = Field(
        0.0, description="requests arriving earlier are left out of the statistics"
    )
    seed: int = Field(0, description="seeds arrivals and service noise")
    service_cv: Annotated[float, Field(ge=0)] | None = Field(
        None, description="batch time CV for every revision; None: each profile's"
    )
    queue_limit_images: Annotated[int, Field(ge=1)] | None = Field(
        None, description="queued images per revision beyond which arrivals are dropped"
    )
    timeout_s: Annotated[float, Field(gt=0)] | None = Field(
        None, description="a request still queued after this long times out"
    )
    autoscaler: AutoscalerConfig | None = Field(None, description="None: fixed pools")


@dataclass(frozen=True, slots=True)
class Placement:
    gpu: str
    replicas: int


def placement(plan: Plan) -> dict[str, Placement]:
    """The planned pools, as the simulator's starting point."""
    return {name: Placement(r.gpu, r.replicas) for name, r in plan.revisions.items()}


@dataclass(frozen=True, slots=True)
class TierStats:
    completed: int
    dropped: int  # refused: the queue limit was reached
    timed_out: int  # still queued timeout_s after arriving
    unserved: int  # never served: no replica ever ran (zero replicas granted)
    mean_s: float
    p50_s: float
    p95_s: float
    p99_s: float


@dataclass(frozen=True, slots=True)
class RevisionStats:
    batches: int
    mean_batch_images: float
    busy: float  # busy time / replica time (cold starts included)
    gpu_seconds: float


@dataclass(frozen=True, slots=True)
class SimResult:
    tiers: dict[str, TierStats]
    revisions: dict[str, RevisionStats]
    # (time, replicas held per revision, GPUs held per GPU type) at start and each tick
    timeline: list[tuple[float, dict[str, int], dict[str, float]]]
    peak_gpus: dict[str, float]  # most GPUs ever held per GPU type (launches count at once)
    gpu_seconds: float
    cost: float


def simulate(
    inputs: PlanInputs,
    pools: dict[str, Placement] | Plan,
    config: SimConfig,
    arrivals: list[Arrival] | None = None,
) -> SimResult:
    """Run the pools (a Plan, or revision -> Placement) against `arrivals`
    (default: Poisson at the inputs' rates for config.duration_s)."""
    if isinstance(pools, Plan):
        pools = placement(pools)
    if arrivals is None:
        arrivals = poisson_arrivals(inputs, config.duration_s, config.seed)
    arrivals = [a for a in arrivals if a.time_s < config.duration_s]
    return _Sim(inputs, pools, config, arrivals).run()


@dataclass(eq=False, slots=True)
class _Replica:
    launched: float
    gpus: float
    serving: bool = False
    stopping: bool = False
    busy: bool = False
    stopped: float | None = None
    wake: simpy.Event | None = None


@dataclass(eq=False)
class _Rev:
    name: str
    gpu: str
    profile: Profile
    priority: int
    min_replicas: int
    max_replicas: int
    max_batch: int
    spmp: np.ndarray  # index: images in the batch
    noise: np.ndarray
    queue: deque = field(default_factory=deque)
    queued_images: int = 0
    running_images: int = 0
    replicas: list[_Replica] = field(default_factory=list)
    idle: list[_Replica] = field(default_factory=list)
    busy_s: float = 0.0
    batches: int = 0
    batch_images: int = 0
    drawn: int = 0
    up_since: float | None = None
    down_since: float | None = None

    def held(self) -> list[_Replica]:
        """Replicas launched and not told to stop (starting or serving)."""
        return [r for r in self.replicas if r.stopped is None and not r.stopping]


class _Sim:
    def __init__(self, inputs: PlanInputs, pools: dict[str, Placement], config: SimConfig,
                 arrivals: list[Arrival]) -> None:
        self.inputs, self.config, self.env = inputs, config, simpy.Environment()
        routed = tiers_by_revision(inputs)
        missing = set(routed) - set(pools)
        if missing:
            raise ValueError(f"no placement for revisions {sorted(missing)}")
        self.start = {name: pools[name].replicas for name in routed}
        seeds = np.random.SeedSequence(config.seed).spawn(len(routed))
        self.revs = {name: self._rev(name, pools[name], seed, len(arrivals))
                     for (name, seed) in zip(sorted(routed), seeds, strict=True)}
        self._requests(arrivals)
        self.timeline: list[tuple[float, dict[str, int], dict[str, float]]] = []
        self.peak = {gpu: 0.0 for gpu in inputs.nodes}

    def _rev(self, name: str, place: Placement, seed: np.random.SeedSequence, n: int) -> _Rev:
        spec, node = self.inputs.revisions[name], self.inputs.nodes[place.gpu]
        profile = spec.profiles[place.gpu]
        cv = profile.service_cv if self.config.service_cv is None else self.config.service_cv
        rng = np.random.default_rng(seed)
        # One draw per batch at most; batches never outnumber requests.
        noise = rng.gamma(1 / cv**2, cv**2, n + 1) if cv > 0 else np.ones(n + 1)
        # spmp is flat past its largest measured batch, so the table can stop there
        # (a lone request heavier than max_batch reads the last entry)
        biggest = max(profile.max_batch_images, *profile.seconds_per_megapixel)
        return _Rev(
            name=name, gpu=place.gpu, profile=profile,
            priority=revision_priority(self.inputs, name),
            min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
            max_batch=max(1, profile.usable_batch(node)),
            spmp=np.array([0.0] + [profile.spmp(b) for b in range(1, biggest + 1)]),
            noise=noise,
        )

    def _requests(self, arrivals: list[Arrival]) -> None:
        """Arrivals as arrays; work in megapixel-steps at the serving profile's steps."""
        n = len(arrivals)
        self.tier_names = sorted(self.inputs.tiers)
        tier_index = {t: i for i, t in enumerate(self.tier_names)}
        self.time = np.empty(n)
        self.tier = np.empty(n, dtype=np.int64)
        self.images = np.empty(n, dtype=np.int64)
        self.work = np.empty(n)
        self.rev_of: list[_Rev] = []
        for i, a in enumerate(arrivals):
            if a.tier not in tier_index:
                raise ValueError(f"trace tier {a.tier!r} is not in the plan inputs")
            rev = self.revs[self.inputs.tiers[a.tier].revision]
            steps = rev.profile.steps if a.steps is None else a.steps
            self.time[i], self.tier[i], self.images[i] = a.time_s, tier_index[a.tier], a.n
            self.work[i] = a.n * a.width * a.height / 1e6 * steps / rev.profile.steps
            self.rev_of.append(rev)
        self.images_list = self.images.tolist()  # python ints: faster in the hot loop
        self.done = np.full(n, math.nan)
        self.status = np.zeros(n, dtype=np.int8)

    # --- processes --------------------------------------------------------------

    def run(self) -> SimResult:
        for rev in self.revs.values():
            for _ in range(self.start[rev.name]):
                self._launch(rev, cold_s=0.0)
        self._record()
        self.env.process(self._arrive())
        if self.config.autoscaler is not None:
            self.env.process(self._autoscale(self.config.autoscaler))
        self.env.run()  # arrivals end at duration_s; then the queues drain
        return self._result()

    def _arrive(self) -> Generator[simpy.Event, Any, None]:
        env, limit = self.env, self.config.queue_limit_images
        for i, t in enumerate(self.time.tolist()):
            if t > env.now:
                yield env.timeout(t - env.now)
            rev, n = self.rev_of[i], self.images_list[i]
            if limit is not None and rev.queued_images + n > limit:
                self.status[i] = _DROPPED
                continue
            rev.queue.append(i)
            rev.queued_images += n
            if rev.idle:
                rep = rev.idle.pop()
                rep.wake.succeed()

    def _serve(self, rev: _Rev, rep: _Replica, cold_s: float) -> Generator[simpy.Event, Any, None]:
        env = self.env
        if cold_s > 0:
            yield env.timeout(cold_s)
        rep.serving = True
        while not rep.stopping:
            batch, images, work = self._take(rev)
            if not batch:
                rep.wake = env.event()
                rev.idle.append(rep)
                yield rep.wake
                continue
            seconds = work * rev.spmp[min(images, len(rev.spmp) - 1)] * rev.noise[rev.drawn]
            rev.drawn += 1
            rev.running_images += images
            rep.busy = True
            yield env.timeout(seconds)
            rep.busy = False
            rev.running_images -= images
            rev.busy_s += seconds
            rev.batches += 1
            rev.batch_images += images
            self.done[batch] = env.now
            self.status[batch] = _DONE
        if rep.stopped is None:
            rep.stopped = env.now
        if rev.queue and rev.idle:  # it may have been woken for work it now leaves
            rev.idle.pop().wake.succeed()

    def _take(self, rev: _Rev) -> tuple[list[int], int, float]:
        queue, timeout, now = rev.queue, self.config.timeout_s, self.env.now
        batch: list[int] = []
        images, work = 0, 0.0
        while queue:
            i = queue[0]
            n = self.images_list[i]
            if timeout is not None and now - self.time[i] > timeout:
                queue.popleft()
                rev.queued_images -= n
                self.status[i] = _TIMED_OUT
                continue
            if batch and images + n > rev.max_batch:
                break
            queue.popleft()
            batch.append(i)
            images += n
            work += self.work[i]
        rev.queued_images -= images
        return batch, images, work

    def _launch(self, rev: _Rev, cold_s: float) -> None:
        rep = _Replica(self.env.now, rev.profile.gpus_per_replica)
        rev.replicas.append(rep)
        self.peak[rev.gpu] = max(self.peak[rev.gpu], self._gpus_held(rev.gpu))
        self.env.process(self._serve(rev, rep, cold_s))

    def _stop(self, rev: _Rev, count: int) -> None:
        """Stop `count` replicas: starting ones first, then idle, then busy
        (a busy one finishes its batch, holding its GPUs until then)."""
        held = rev.held()
        order = ([r for r in reversed(held) if not r.serving]
                 + [r for r in held if r.serving and not r.busy]
                 + [r for r in held if r.busy])
        for rep in order[:count]:
            rep.stopping = True
            if not rep.busy:  # a starting replica is cancelled, an idle one just leaves
                rep.stopped = self.env.now
            if rep in rev.idle:
                rev.idle.remove(rep)
                rep.wake.succeed()

    def _gpus_held(self, gpu: str) -> float:
        return sum(r.gpus for rev in self.revs.values() if rev.gpu == gpu
                   for r in rev.replicas if r.stopped is None)

    # --- the autoscaler -----------------------------------------------------------

    def _autoscale(self, cfg: AutoscalerConfig) -> Generator[simpy.Event, Any, None]:
        while self.env.now + cfg.interval_s < self.config.duration_s:
            yield self.env.timeout(cfg.interval_s)
            for gpu, node in sorted(self.inputs.nodes.items()):
                self._scale(gpu, node.max_nodes * node.gpus_per_node, cfg)
            self._record()

    def _scale(self, gpu: str, budget: float, cfg: AutoscalerConfig) -> None:
        revs = sorted((r for r in self.revs.values() if r.gpu == gpu),
                      key=lambda r: (-r.priority, r.name))
        demands = [
            Demand(r.name, r.priority, r.profile.gpus_per_replica, r.min_replicas,
                   r.max_replicas, desired_replicas(r.queued_images, r.running_images,
                                                    len(r.held()), cfg.target_images_per_replica))
            for r in revs
        ]
        targets = allocate(demands, budget)
        now = self.env.now
        for rev in revs:
            held, target = len(rev.held()), targets[rev.name]
            if target > held:
                rev.down_since = None
                rev.up_since = now if rev.up_since is None else rev.up_since
                if now - rev.up_since >= cfg.upscale_delay_s:
                    # GPUs still held by draining replicas are not free yet
                    free = budget - self._gpus_held(gpu)
                    room = math.floor((free + 1e-9) / rev.profile.gpus_per_replica)
                    for _ in range(min(target - held, room)):
                        self._launch(rev, cfg.cold_start_s)
                    rev.up_since = None
            elif target < held:
                rev.up_since = None
                rev.down_since = now if rev.down_since is None else rev.down_since
                # Serve applies downscale_delay_s to every decision, a budget-forced
                # one too (its policy wrapper has no bypass), so the simulator does.
                if now - rev.down_since >= cfg.downscale_delay_s:
                    self._stop(rev, held - target)
                    rev.down_since = None
            else:
                rev.up_since = rev.down_since = None

    # --- results ------------------------------------------------------------------

    def _record(self) -> None:
        held = {name: len(rev.held()) for name, rev in sorted(self.revs.items())}
        gpus = {gpu: self._gpus_held(gpu) for gpu in sorted(self.inputs.nodes)}
        self.timeline.append((self.env.now, held, gpus))

    def _result(self) -> SimResult:
        end = self.config.duration_s
        counted = self.time >= self.config.warmup_s
        latency = self.done - self.time
        tiers = {}
        for k, name in enumerate(self.tier_names):
            mine = counted & (self.tier == k)
            tiers[name] = _tier_stats(latency[mine & (self.status == _DONE)],
                                      self.status[mine])
        revisions, gpu_seconds, cost = {}, 0.0, 0.0
        for name, rev in sorted(self.revs.items()):
            node = self.inputs.nodes[rev.gpu]
            held = sum(r.gpus * max(0.0, min(end, _end(r, end)) - r.launched)
                       for r in rev.replicas)
            serving = sum(_end(r, self.env.now) - r.launched for r in rev.replicas)
            revisions[name] = RevisionStats(
                batches=rev.batches,
                mean_batch_images=rev.batch_images / rev.batches if rev.batches else 0.0,
                busy=rev.busy_s / serving if serving else 0.0,
                gpu_seconds=held,
            )
            gpu_seconds += held
            cost += held / 3600 * node.cost_per_hour / node.gpus_per_node
        return SimResult(tiers, revisions, self.timeline, self.peak, gpu_seconds, cost)


def _end(rep: _Replica, default: float) -> float:
    return default if rep.stopped is None else rep.stopped


def _tier_stats(latency: np.ndarray, status: np.ndarray) -> TierStats:
    if latency.size:
        mean = float(latency.mean())
        p50, p95, p99 = (float(x) for x in np.percentile(latency, [50, 95, 99]))
    else:
        mean = p50 = p95 = p99 = math.nan
    return TierStats(
        completed=int(latency.size),
        dropped=int((status == _DROPPED).sum()),
        timed_out=int((status == _TIMED_OUT).sum()),
        unserved=int((status == _PENDING).sum()),
        mean_s=mean, p50_s=p50, p95_s=p95, p99_s=p99,
    )
