"""`imagegen bench capacity`: the planner's latency prediction against the real
local stack under open-loop Poisson arrivals at the same rates, side by side.
A benchmark: it prints, it never asserts."""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from tqdm import tqdm

from ..config import Settings
from ..lockfile import load_lock
from ..routing import load_routing
from .bench import throwaway_key


async def _poisson(url: str, key: str, body: dict, rate: float, duration: float,
                   seed: int) -> list[float]:
    """Latencies of requests sent at Poisson times (open loop: a slow answer never
    delays the next arrival, as with real callers)."""
    import aiohttp

    from .bench import fresh_seeds

    rng = random.Random(seed)
    first = fresh_seeds(1).start  # every request a cache miss: the GPU path is measured
    lat: list[float] = []
    errors = 0

    async def one(session, i: int) -> None:
        nonlocal errors
        t = time.perf_counter()
        async with session.post(url, json={**body, "seed": first + i}) as r:
            await r.read()
            if r.status != 200:
                errors += 1
                return
        lat.append(time.perf_counter() - t)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     headers={"Authorization": f"Bearer {key}"}) as session:
        start, at, tasks = time.perf_counter(), 0.0, []
        with tqdm(total=round(rate * duration), desc=f"{rate:g} req/s", leave=False) as bar:
            while (at := at + rng.expovariate(rate)) < duration:
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(session, len(tasks))))
                bar.update()
            await asyncio.gather(*tasks)
    if errors:
        print(f"  {errors} requests failed at {rate:g} req/s")
    return lat


def run(args: argparse.Namespace, settings: Settings) -> int:
    from autoscaling import planner
    from autoscaling.capacity import ModelFacts, plan_inputs
    from autoscaling.policies import load_policy

    from .. import local
    from ..tinymodels import build_missing
    from .bench import _pct

    build_missing(settings.lock_file, settings.model_dir)
    lock = load_lock(settings.lock_file)
    routing = load_routing(settings.routing_file, lock)
    model = routing.resolve(args.tier)
    policy = load_policy(settings.policy_file)
    replicas = policy.for_model(model).autoscaling.max_replicas
    facts = ModelFacts.of_lock(lock.models)
    settings, key = throwaway_key(settings.model_copy(update={"port": args.port, "grpc_port": 0}))
    url = local.start(settings) + "/v1/images"
    rows = []
    try:
        body = {"prompt": "a lighthouse at dusk", "tier": args.tier}
        asyncio.run(_poisson(url, key, body, 5, 3, 0))  # warm up
        for rate in args.rates:
            lat = asyncio.run(_poisson(url, key, body, rate, args.duration, int(rate)))
            inputs = plan_inputs(policy, facts, {args.tier: model}, {args.tier: rate},
                                 {args.tier: 10.0}, service_cv=args.cv,
                                 overhead_s=args.overhead_ms / 1e3)
            gpu = next(iter(inputs.revisions[model].profiles))
            perf = planner.performance(inputs, model, replicas, gpu=gpu, rate_rps=rate)
            rows.append((rate, len(lat), _pct(lat, 0.5), _pct(lat, 0.95),
                         perf.p50_s * 1e3, perf.p95_s * 1e3, perf.mean_batch_images))
    finally:
        local.stop()
    print(f"\nimagegen bench capacity — {model}, {replicas} replicas, open-loop Poisson, "
          f"{args.duration:g} s per rate; planner overhead {args.overhead_ms:g} ms\n")
    print(f"{'req/s':>6}{'done':>6}{'p50 ms':>8}{'p95 ms':>8}{'plan p50':>9}{'plan p95':>9}"
          f"{'p95 x plan':>11}{'plan batch':>11}")
    for rate, n, p50, p95, q50, q95, batch in rows:
        print(f"{rate:>6g}{n:>6}{p50:>8.1f}{p95:>8.1f}{q50:>9.1f}{q95:>9.1f}"
              f"{p95 / q95:>11.2f}{batch:>11.2f}")
    return 0
