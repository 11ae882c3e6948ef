"""`imagegen capacity profile`: seconds per megapixel by batch size, and peak
memory, of one revision on this machine's accelerator. Engine-agnostic: it drives
an Engine (serve/engines) and never imports torch itself.

In place (`--in-place`): the same figures read off a running stack's own counters
over a window of its real traffic, where the replicas share cores with the
ingress, Ray and the callers, instead of a quiet core."""

from __future__ import annotations

import datetime
import math
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from serve.engines.base import Engine, Job
from serve.lockfile import Profile


def measure(
    engine: Engine, job: Job, batches: Iterable[int], *, repeats: int = 3, warmup: int = 1,
    device: str, software: str = "", tick: Callable[[], None] | None = None,
) -> Profile:
    """Time `engine.generate` on batches of copies of `job` (distinct seeds).

    Each batch size: `warmup` untimed calls (lazy init, compilation, allocator
    growth), then the median of `repeats` timed calls. Peak memory is the
    accelerator's peak in that window; on the CPU the process's peak RSS so far
    (it cannot be reset: batch sizes are measured smallest first).
    """
    megapixels = job.width * job.height / 1e6
    spmp: dict[int, float] = {}
    peak: dict[int, float] = {}
    for b in sorted(set(batches)):
        jobs = [replace(job, seed=job.seed + i) for i in range(b)]
        engine.reset_peak_memory()
        for _ in range(warmup):
            engine.generate(jobs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.generate(jobs)  # returns host arrays: the device has synchronised
            times.append(time.perf_counter() - t0)
            if tick:
                tick()
        spmp[b] = round(statistics.median(times) / (b * megapixels), 6)
        accel = engine.peak_memory()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        peak[b] = round((accel if accel is not None else rss) / 1e9, 3)
    return Profile(
        measured=datetime.date.today().isoformat(), device=device, width=job.width,
        height=job.height, steps=job.steps, attention=getattr(engine, "attention", "n/a"),
        compiled=bool(getattr(engine, "compiled", False)), software=software,
        seconds_per_megapixel=spmp, peak_memory_gb=peak,
    )


# --- in place: from a running stack's metrics ------------------------------------

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Series:
    """Prometheus text -> {(name without Ray's `ray_` prefix, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("ray_")
            out[(name, frozenset(s.labels.items()))] = s.value
    return out


@dataclass(frozen=True, slots=True)
class InPlace:
    """What a window of a running stack's traffic says."""

    profiles: dict[str, Profile]  # model -> its quiet-core-equivalent profile
    measured_spmp: dict[str, dict[int, float]]  # model -> as measured, contention in it
    slowdown: dict[str, float]  # model -> the contention the window's batches ran under
    busy: dict[str, float]  # model -> busy fraction per replica
    requests_per_s: float
    cpu_cores_busy: float | None  # the node's, over the window
    cpu_per_request_s: float | None  # core-seconds per request outside the pipelines


def in_place(
    before: Series, after: Series, window_s: float, *, models: dict[str, tuple[int, float]],
    cores: float, steps: dict[str, int], cpu_cores_busy: float | None, device: str,
    software: str = "", size: dict[str, tuple[int, int]] | None = None,
) -> InPlace:
    """Profiles from the counters' growth over a window. `models`: model -> (replicas,
    threads per running batch); `cores`: the node's; `cpu_cores_busy`: the node's
    busy cores over the window (None: unknown, then no contention is taken out).

    A model's seconds per megapixel at batch b is its busy seconds over its
    megapixel-steps at b, times its `steps`. Those ran slowed by what else ran on
    the cores (planner.expected_slowdown, from the window's busy fractions and the
    stack's own core time): dividing it out gives the quiet-core profile the planner
    slows again for the load it plans for."""
    from .planner import expected_slowdown

    def grew(name: str, **match: str) -> dict[frozenset, float]:
        out: dict[frozenset, float] = {}
        for (n, labels), v in after.items():
            if n != name or any(dict(labels).get(k) != x for k, x in match.items()):
                continue
            out[labels] = v - before.get((n, labels), 0.0)
        return out

    measured: dict[str, dict[int, float]] = {}
    busy: dict[str, float] = {}
    for model in models:
        secs, work = grew("imagegen_pipeline_busy_seconds_total", model=model), grew(
            "imagegen_pipeline_work_total", model=model)
        by_batch: dict[int, list[float]] = {}
        for labels, s in secs.items():
            b = int(dict(labels)["images"])
            w = work.get(frozenset((k, v) for k, v in labels), 0.0)
            acc = by_batch.setdefault(b, [0.0, 0.0])
            acc[0] += s
            acc[1] += w
        measured[model] = {b: s / w * steps[model] for b, (s, w) in sorted(by_batch.items())
                           if w > 0 and s > 0}
        busy[model] = sum(secs.values()) / window_s / max(1, models[model][0])
    requests = sum(v for (n, _), v in after.items() if n == "imagegen_requests_total") - sum(
        v for (n, _), v in before.items() if n == "imagegen_requests_total")
    rate = requests / window_s
    slowdown = {m: 1.0 for m in models}
    stack_cores = 0.0
    if cpu_cores_busy is not None:
        # A slowed batch gets 1/slowdown of the threads it wants: the pipelines' own
        # core use and the stack's (the rest) are solved together.
        for _ in range(50):
            used = sum(busy[m] * models[m][0] * models[m][1] / slowdown[m] for m in models)
            stack_cores = max(0.0, cpu_cores_busy - used)
            new = {m: expected_slowdown(
                threads + stack_cores, cores,
                [(models[q][0] - (q == m), min(1.0, busy[q]), models[q][1]) for q in models])
                for m, (_, threads) in models.items()}
            if all(abs(new[m] - slowdown[m]) < 1e-6 for m in models):
                break
            slowdown = {m: 0.5 * (slowdown[m] + new[m]) for m in models}
    stack = stack_cores / rate if cpu_cores_busy is not None and rate > 0 else None
    profiles = {}
    for m, table in measured.items():
        if not table:
            continue
        quiet = {b: round(t / slowdown[m], 6) for b, t in table.items()}
        # batch x spmp must not fall (planner inputs refuse it): a noisy window can
        quiet = monotone(quiet)
        w, h = (size or {}).get(m, (0, 0))
        profiles[m] = Profile(
            measured=datetime.date.today().isoformat(), device=device, width=max(8, w),
            height=max(8, h), steps=steps[m], attention="n/a", software=software,
            seconds_per_megapixel=quiet, peak_memory_gb={b: 0.0 for b in quiet},
        )
    return InPlace(profiles, measured, slowdown, busy, rate, cpu_cores_busy, stack)


def monotone(spmp: dict[int, float]) -> dict[int, float]:
    """Raise any batch whose total time falls below a smaller batch's to match it."""
    out, floor = {}, 0.0
    for b in sorted(spmp):
        # rounded up to the microsecond: rounding down could undercut the floor again
        out[b] = math.ceil(max(spmp[b], floor / b) * 1e6) / 1e6
        floor = out[b] * b
    return out
