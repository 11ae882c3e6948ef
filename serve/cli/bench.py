"""`imagegen bench serve`: the tiny pipeline in-process vs the full stack over
HTTP, the OpenAI route and gRPC
(`imagegen bench capacity`: bench_capacity.py; `bench serve --peers`, against
LitServe and BentoML: bench_peers.py).

Both halves run in one command on the same thread count, so the ratios compare
like with like. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from tqdm import tqdm

from ..config import Settings
from ..engines.base import EngineSpec, Job
from ..lockfile import load_lock
from ..routing import load_routing
from . import bench_peers
from .common import settings as settings_of

# The benchmarks with a module of their own (add_arguments, run); `serve` and
# `capacity` are built here.
_BENCHES = {"state": "bench_state", "policy": "bench_policy", "flood": "bench_flood",
            "safety": "bench_safety", "cache": "bench_cache", "encode": "bench_encode",
            "batch": "bench_batch", "naive": "bench_naive", "coldstart": "bench_coldstart",
            "batching": "bench_batching", "all": "bench_all", "gpu": "bench_gpu"}
_HELP = {
    "gpu": "the engine's fast path vs plain diffusers (SDXL-arch), and GPU capacity "
           "profiles, in one time-boxed run",
    "state": "what authenticating costs per request, per state store backend",
    "policy": "what the prompt policy costs per prompt, at 10,000 terms",
    "flood": "more requests at once than a revision queues: how fast the rest are refused",
    "safety": "what the image classifier costs: in-process, and per placement in the stack",
    "cache": "a cache hit against a miss through the whole stack",
    "encode": "what encoding costs per format and size, and the watermark",
    "batch": "interactive latency with a batch running, and how fast a cancel stops it",
    "naive": "the baseline to beat: the same model on plain Ray Serve (FastAPI ingress -> "
             "model, no batching) vs in-process vs imagegen",
    "coldstart": "process start to ready, and model load time against bytes / read bandwidth",
    "batching": "the batching curve: images/s by batch size, in-process and through the stack",
    "all": "every benchmark in turn, JSON in one folder (--quick: reduced runs)",
}


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmarks (not tests)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bs = bsub.add_parser("serve", help="in-process pipeline vs the full stack (HTTP, OpenAI "
                         "route, gRPC)")
    bs.add_argument("--model", default="tiny-draft")
    bs.add_argument("--requests", type=int, default=200, help="requests per measured point")
    bs.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    bs.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    bs.add_argument("--port", type=int, default=8123)
    bs.add_argument("--grpc-port", type=int, default=9123)
    bs.add_argument("--json", type=Path, help="also write the figures as JSON")
    bench_peers.add_arguments(bs)
    from . import bench_capacity

    bench_capacity.add_arguments(bsub.add_parser(
        "capacity", help="planner prediction vs the stack under Poisson load"))
    for name, module in _BENCHES.items():
        importlib.import_module(f".{module}", __package__).add_arguments(
            bsub.add_parser(name, help=_HELP[name]))
    return b


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.bench_command == "capacity":
        from . import bench_capacity

        return bench_capacity.run(args, settings)
    if module := _BENCHES.get(args.bench_command):
        return importlib.import_module(f".{module}", __package__).run(args, settings)
    if args.peers or args.setup:
        return bench_peers.run(args, settings)
    return run_serve(args, settings)


@dataclass
class Point:
    name: str
    concurrency: int
    requests: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    mean_batch: float | None = None
    route: str = ""  # the stack's points: HTTP, OpenAI or gRPC (ROUTES)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1e3


def _point(name: str, c: int, lat: list[float], images: int, wall: float, batch=None) -> Point:
    return Point(name, c, len(lat), images / wall, _pct(lat, 0.5), _pct(lat, 0.95), batch)


def engine_spec(entry, settings: Settings, threads: int) -> EngineSpec:
    """The revision's engine as a bench runs it in-process: as its replicas do (the
    lock's engine table, then the settings'), at `threads` torch threads."""
    return EngineSpec(entry.name, entry.revision, entry.local_dir(settings.model_dir),
                      entry.pipeline, entry.dtype,
                      entry.engine_options(settings.engine_options, {"threads": threads}))


def bench_in_process(entry, settings: Settings, threads: int, n: int, batch: int) -> list[Point]:
    from ..engines.diffusers_engine import DiffusersEngine

    spec = engine_spec(entry, settings, threads)
    engine = DiffusersEngine(spec)
    engine.load()
    d = entry.defaults
    job = Job("a lighthouse at dusk", "", d.width, d.height, d.steps, d.guidance, 0)
    for _ in range(3):
        engine.warmup(job)
    lat = []
    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="in-process, one at a time", leave=False):
        t = time.perf_counter()
        engine.generate([replace(job, seed=i)])
        lat.append(time.perf_counter() - t)
    single = _point("in-process single", 1, lat, n, time.perf_counter() - t0)
    batches = max(3, n // batch)
    lat = []
    t0 = time.perf_counter()
    for b in tqdm(range(batches), desc=f"in-process, batches of {batch}", leave=False):
        t = time.perf_counter()
        engine.generate([replace(job, seed=b * batch + i) for i in range(batch)])
        lat.append(time.perf_counter() - t)
    batched = _point(f"in-process batch {batch}", batch, lat, batches * batch,
                     time.perf_counter() - t0, batch)
    del engine
    return [single, batched]


def throwaway_key(settings: Settings) -> tuple[Settings, str]:
    """Settings whose state store is a fresh temporary file holding one key, and the
    key: a benchmark never writes to the user's state store."""
    import tempfile

    from ..quotas.keys import open_keys
    from ..quotas.principals import new_key, record_for

    url = f"sqlite://{tempfile.mkdtemp(prefix='imagegen-bench-')}/state.db"
    key_id, key = new_key()

    async def add() -> None:
        store = open_keys(url)
        await store.add(record_for(key, key_id, "bench"))
        await store.close()

    asyncio.run(add())
    # One client is every request: no fair-share cap on it.
    return settings.model_copy(update={"state_url": url, "in_flight_per_principal": 0}), key


def fresh_seeds(n: int) -> range:
    """Seeds no earlier run of this process used: every request a cache miss (a body
    that names its seed repeats it: every request after the first a hit)."""
    import secrets

    start = secrets.randbelow(2**31)
    return range(start, start + n)


async def _load(url: str, key: str, body: dict, n: int, c: int
                ) -> tuple[list[float], float, list[int]]:
    from .bench_peers import post_load

    return await post_load(url, lambda seed: {"seed": seed, **body}, n, c,
                           {"Authorization": f"Bearer {key}"})


async def _load_grpc(target: str, key: str, body: dict, n: int, c: int
                     ) -> tuple[list[float], float, list[int]]:
    """As _load, over one gRPC channel (HTTP/2 carries the c calls at once)."""
    import grpc

    from ..ingress.proto import images_pb2 as pb
    from ..ingress.proto import images_pb2_grpc as pb_grpc

    lat: list[float] = []
    batch_sizes: list[int] = []
    bar = tqdm(total=n, desc=f"gRPC Generate, concurrency {c}", leave=False)
    remaining = iter(fresh_seeds(n))

    async def worker(stub) -> None:
        for i in remaining:
            t = time.perf_counter()
            r = await stub.Generate(pb.GenerateRequest(**{"seed": i, **body}), timeout=120,
                                    metadata=(("authorization", f"Bearer {key}"),))
            lat.append(time.perf_counter() - t)
            batch_sizes.append(r.batch_images)
            bar.update()

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImagesStub(channel)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(stub) for _ in range(c)))
        wall = time.perf_counter() - t0
    bar.close()
    return lat, wall, batch_sizes


# The transports measured side by side: every level on the native route, the
# lowest and highest on the others (added latency at c=1, throughput under load).
ROUTES = (("HTTP", "/v1/images"), ("OpenAI", "/v1/images/generations"), ("gRPC", None))


def bench_stack(settings: Settings, tier: str, n: int, levels: list[int]) -> list[Point]:
    from .. import local

    settings, key = throwaway_key(settings)
    base = local.start(settings)
    try:
        body = {"prompt": "a lighthouse at dusk", "tier": tier}
        points = []
        for i, (route, path) in enumerate(ROUTES):
            if path is None and not settings.grpc_port:
                continue  # --grpc-port 0: no gRPC rows
            if path is None:
                load = partial(_load_grpc, f"{settings.host}:{settings.grpc_port}", key)
            else:
                load = partial(_load, base + path, key)
            asyncio.run(load(body, 10, 1))  # warm the handles and replica
            for c in levels if i == 0 else sorted({min(levels), max(levels)}):
                lat, wall, sizes = asyncio.run(load(body, max(n, 4 * c), c))
                points.append(_point(f"{route} c={c}", c, lat, len(lat), wall,
                                     statistics.fmean(sizes)))
                points[-1].route = route
        return points
    finally:
        local.stop()


def _report(points: list[Point], threads: int, batch: int, layout: str) -> dict:
    single, batched, *stack = points
    print(f"\nimagegen bench serve — {os.cpu_count()} cores; in-process: {threads} torch "
          f"threads; stack: {layout}; max batch {batch} images\n")
    print(f"{'point':<24}{'img/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'batch':>7}")
    for p in points:
        mb = f"{p.mean_batch:.1f}" if p.mean_batch else "1"
        print(f"{p.name:<24}{p.images_per_s:>8.1f}{p.p50_ms:>9.1f}{p.p95_ms:>9.1f}{mb:>7}")
    ratios = {}
    print()
    for p in stack:
        key = "" if p.route == "HTTP" else f"{p.route.lower()}_"
        if p.concurrency == 1:
            ratios[f"{key}added_p50_ms_c1"] = p.p50_ms - single.p50_ms
            print(f"{p.route}: added latency at c=1, p50: "
                  f"{ratios[f'{key}added_p50_ms_c1']:+.1f} ms (target <= 10 ms)")
        ratio = ratios[f"{key}throughput_ratio_c{p.concurrency}"] = (
            p.images_per_s / batched.images_per_s)
        print(f"{p.route}: throughput c={p.concurrency} / in-process batched: {ratio:.2f}x"
              + (" (target >= 0.9x)" if p.concurrency == 32 else ""))
    return ratios


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    from autoscaling.policies import load_policy

    from ..tinymodels import build_missing

    build_missing(settings.lock_file, settings.model_dir)
    lock = load_lock(settings.lock_file)
    entry = lock.get(args.model)
    tiers = load_routing(settings.routing_file, lock).tiers_of(entry.name)
    if not tiers:
        print(f"model {entry.name} is not routed by any tier; nothing to call over HTTP")
        return 2
    # Same total thread count on both sides: the in-process pipeline gets every
    # core; the stack runs the model's policy (replicas x cpu_threads) unless
    # --threads pins both.
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    policy = load_policy(settings.policy_file).for_model(entry.name)
    batch = policy.batching.max_batch_images
    replicas = policy.autoscaling.max_replicas
    per_replica = args.threads or settings.threads or policy.cpu_threads or cores
    layout = f"{replicas} replica(s) x {per_replica} thread(s)"
    points = bench_in_process(entry, settings, threads, args.requests, batch)
    stack_settings = settings.model_copy(update={
        "port": args.port, "grpc_port": args.grpc_port, "threads": args.threads,
        "engine": "diffusers"})
    points += bench_stack(stack_settings, tiers[0], args.requests, args.concurrency)
    ratios = _report(points, threads, batch, layout)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"threads": threads, "stack": layout, "batch": batch, "points": [asdict(p) for p in points],
             "ratios": ratios}, indent=2))
    return 0
