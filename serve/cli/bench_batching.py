"""`imagegen bench batching`: the batching curve, side by side in one run: images/s
and s/image by batch size through DiffusersEngine in this process (one pipeline call
per batch, `--threads` torch threads), beside what the models.lock profile for this
device says (the planner's input), and through the stack at the matching concurrency
(one replica at the same thread count: c clients keep up to c images in its batches).
Ratios against batch 1. Timings are printed, never asserted."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

PROMPT = "a lighthouse at dusk"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-draft")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes")
    p.add_argument("--calls", type=int, default=20, help="pipeline calls per in-process size")
    p.add_argument("--requests", type=int, default=64,
                   help="requests per stack point (at least 4 x the concurrency)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, in process and in the stack's one replica")
    p.add_argument("--skip-stack", action="store_true", help="only the in-process curve")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


@dataclass
class CurvePoint:
    where: str  # "in-process" or "stack"
    batch: int  # in-process: images per call; stack: concurrent clients
    images: int
    images_per_s: float
    s_per_image: float
    p50_ms: float  # in-process: per call; stack: per request
    mean_batch: float  # images per pipeline call (the stack reports its own)


def ratios_to_first(points: list[CurvePoint]) -> list[float]:
    """Each point's images/s over the first point's (batch 1, or the smallest)."""
    return [p.images_per_s / points[0].images_per_s for p in points] if points else []


def profile_s_per_image(entry, device: str, batch: int) -> float | None:
    """s/image the lock's profile for `device` predicts at `batch`, at the profiled
    size (None: no profile, or the batch was not profiled)."""
    profile = entry.profiles.get(device)
    if profile is None or batch not in profile.seconds_per_megapixel:
        return None
    return profile.seconds_per_megapixel[batch] * profile.width * profile.height / 1e6


def bench_engine(entry, settings, sizes: list[int], calls: int, threads: int
                 ) -> list[CurvePoint]:
    from ..engines.base import Job
    from ..engines.diffusers_engine import DiffusersEngine
    from .bench import _pct, engine_spec

    spec = engine_spec(entry, settings, threads)
    engine = DiffusersEngine(spec)
    engine.load()
    d = entry.defaults
    job = Job(PROMPT, "", d.width, d.height, d.steps, d.guidance, 0)
    engine.warmup(job)
    points = []
    for b in sizes:
        batch = [replace(job, seed=i) for i in range(b)]
        for _ in range(2):
            engine.generate(batch)  # warm this shape
        lat = []
        t0 = time.perf_counter()
        for _ in tqdm(range(calls), desc=f"in-process, batches of {b}", leave=False):
            t = time.perf_counter()
            engine.generate(batch)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        points.append(CurvePoint("in-process", b, b * calls, b * calls / wall,
                                 wall / (b * calls), _pct(lat, 0.5), b))
    return points


def bench_stack(entry, settings, tier: str, sizes: list[int], n: int, threads: int
                ) -> list[CurvePoint]:
    import tempfile

    import yaml

    from .. import local
    from .bench import _load, _pct, throwaway_key
    from .bench_peers import one_replica_policy
    from .bench_safety import _start_when_free

    doc = one_replica_policy(yaml.safe_load(settings.policy_file.read_text()), entry.name)
    doc["models"][entry.name]["cpu_threads"] = threads
    policy = Path(tempfile.mkdtemp(prefix="imagegen-bench-")) / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc))
    stack, key = throwaway_key(settings.model_copy(update={
        "grpc_port": 0, "threads": None, "engine": "diffusers", "policy_file": policy,
        "image_classifier": "none"}))
    base = _start_when_free(stack)
    points = []
    try:
        body = {"prompt": PROMPT, "tier": tier}
        asyncio.run(_load(base + "/v1/images", key, body, 10, 1))  # warm handles, replica
        for c in sizes:
            lat, wall, batches = asyncio.run(
                _load(base + "/v1/images", key, body, max(n, 4 * c), c))
            points.append(CurvePoint("stack", c, len(lat), len(lat) / wall,
                                     wall / len(lat), _pct(lat, 0.5),
                                     statistics.fmean(batches)))
    finally:
        local.stop()
    return points


def _print(points: list[CurvePoint], entry, device: str, threads: int) -> list[dict]:
    out = []
    for where in ("in-process", "stack"):
        mine = [p for p in points if p.where == where]
        if not mine:
            continue
        head = "batch" if where == "in-process" else "clients"
        print(f"\n{where}: {entry.name} {entry.defaults.width}x{entry.defaults.height} "
              f"{entry.defaults.steps} steps, {threads} torch thread(s)"
              + ("" if where == "in-process" else ", one replica") + "\n")
        print(f"{head:<9}{'img/s':>8}{'s/image':>10}{'p50 ms':>9}{'x first':>9}"
              f"{'mean batch':>12}{'profile s/img':>15}")
        for p, ratio in zip(mine, ratios_to_first(mine), strict=True):
            prof = profile_s_per_image(entry, device, p.batch) if where == "in-process" else None
            print(f"{p.batch:<9}{p.images_per_s:>8.1f}{p.s_per_image:>10.4f}{p.p50_ms:>9.1f}"
                  f"{ratio:>8.2f}x{p.mean_batch:>12.1f}"
                  + (f"{prof:>15.4f}" if prof is not None else f"{'-':>15}"))
            out.append(asdict(p) | {"x_first": ratio, "profile_s_per_image": prof})
    return out


def run(args: argparse.Namespace, settings) -> int:
    from ..engines.diffusers_engine import accelerator
    from ..lockfile import load_lock
    from ..routing import load_routing
    from ..tinymodels import build_missing

    if min(args.sizes) < 1 or args.calls < 1 or args.threads < 1:
        print("--sizes, --calls and --threads must be at least 1")
        return 2
    sizes = sorted(set(args.sizes))
    build_missing(settings.lock_file, settings.model_dir)
    lock = load_lock(settings.lock_file)
    entry = lock.get(args.model)
    device = accelerator()[0]
    points = bench_engine(entry, settings, sizes, args.calls, args.threads)
    tiers = load_routing(settings.routing_file, lock).tiers_of(entry.name)
    if not args.skip_stack and tiers:
        stack = settings.model_copy(update={"port": args.port})
        points += bench_stack(entry, stack, tiers[0], sizes, args.requests, args.threads)
    print(f"\nimagegen bench batching — {len(os.sched_getaffinity(0))} cores; x first: "
          f"images/s over batch {sizes[0]}'s; profile: models.lock's {device!r} profile")
    rows = _print(points, entry, device, args.threads)
    if not args.skip_stack and not tiers:
        print(f"(no stack rows: no tier routes {entry.name})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": entry.name, "threads": args.threads, "device": device,
             "points": rows}, indent=2))
    return 0
