"""`imagegen capacity profile`: seconds per megapixel by batch size, and peak
memory, of one revision on this machine's accelerator. Engine-agnostic: it drives
an Engine (serve/engines) and never imports torch itself."""

from __future__ import annotations

import datetime
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

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
