"""`imagegen bench capacity`: the planner's latency prediction against the real
local stack under open-loop Poisson arrivals at the same rates, side by side.
A benchmark: it prints, it never asserts.

One run: start the stack as `make serve` runs it; calibrate (requests one at a time
for the stack's own latency, then a window of load at about half of capacity,
profiled in place: `imagegen capacity profile --in-place`); then rounds of rates at
`--fractions` of the capacity that calibration predicts, interleaved, each measured
by the load generator and predicted by the planner twice: from the models.lock
profile on a quiet core (what `imagegen capacity plan` used before) and from the
in-place profile with the shared-core model. Medians over rounds."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..config import Settings
from ..lockfile import load_lock
from ..routing import load_routing
from .bench import _pct, fresh_seeds, throwaway_key


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tier", default="draft")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.5, 0.8],
                   help="rates as fractions of the capacity calibration predicts")
    p.add_argument("--rates", type=float, nargs="+",
                   help="requests/s instead of --fractions")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per rate and round")
    p.add_argument("--calibrate", type=float, default=30.0,
                   help="seconds of load profiled in place before the rounds")
    p.add_argument("--driver", choices=["locust", "aiohttp"], default="locust",
                   help="load generator: locust (loadtests/, the SRE's tool) or an "
                   "in-process aiohttp client")
    p.add_argument("--cv", type=float, default=0.1, help="planner's batch time CV")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


# --- load -------------------------------------------------------------------------


async def _poisson(url: str, key: str, body: dict, rate: float, duration: float,
                   seed: int) -> tuple[list[float], int]:
    """Latencies of requests sent at Poisson times (open loop: a slow answer never
    delays the next arrival, as with real callers), and the failures."""
    import aiohttp

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
        while (at := at + rng.expovariate(rate)) < duration:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, len(tasks))))
        await asyncio.gather(*tasks)
    return lat, errors


def _locust(base: str, key: str, tier: str, rate: float, duration: float,
            out: Path) -> tuple[list[float], int]:
    """The same open-loop load from locust (loadtests/locustfile.py's Poisson user),
    as an SRE runs it: p50/p95 from its JSON (the CSV can miss the last second)."""
    import os
    import subprocess
    import sys

    from .loadtest import LOADTESTS

    out.mkdir(parents=True, exist_ok=True)
    runs = len(list(out.glob("capacity-*.log")))  # a name per run: never an old file
    stats = out / f"capacity-{runs}"  # locust adds .json (no dot in the stem)
    users = max(8, round(rate * 0.5))  # enough that one slow answer never stalls arrivals
    env = {**os.environ, "IMAGEGEN_API_KEY": key}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOADTESTS / "locustfile.py"), "--headless",
           "--host", base, "--only-summary", "--json-file", str(stats),
           "--imagegen-profile", "steady", "--imagegen-users", str(users),
           "--imagegen-duration", f"{duration:g}", "--imagegen-mix", f"{tier}=1",
           "--imagegen-rate", f"{rate:g}", "--imagegen-template-share", "0",
           "ImagesHttpUser"]
    log = out / f"capacity-{runs}.log"
    with log.open("w") as f:
        subprocess.run(cmd, env=env, check=False, stdout=f, stderr=subprocess.STDOUT,
                       timeout=duration + 120)
    result = out / f"capacity-{runs}.json"
    if not result.exists():
        raise RuntimeError(f"locust wrote no stats; its log: {log}")
    entries = json.loads(result.read_text())
    lat: list[float] = []
    fails = 0
    for e in entries:
        if e["name"] != tier:  # refusals have their own entries ("draft 503")
            continue
        fails += e["num_failures"]
        for ms, count in e["response_times"].items():
            lat.extend([float(ms) / 1e3] * int(count))
    return sorted(lat), fails


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


# --- the run ----------------------------------------------------------------------


def run(args: argparse.Namespace, settings: Settings) -> int:
    from autoscaling import planner
    from autoscaling.capacity import ModelFacts, plan_inputs
    from autoscaling.policies import load_policy
    from autoscaling.profiler import in_place, parse_metrics

    from .. import local
    from ..tinymodels import build_missing
    from .capacity import host_busy_core_seconds

    build_missing(settings.lock_file, settings.model_dir)
    lock = load_lock(settings.lock_file)
    routing = load_routing(settings.routing_file, lock)
    model = routing.resolve(args.tier)
    policy = load_policy(settings.policy_file)
    node_key = "cpu"
    node = policy.cluster.node_types[node_key]
    replicas = {m: max(1, policy.for_model(m).autoscaling.min_replicas) for m in lock.models
                if m in {routing.resolve(t) for t in routing.tiers}}
    threads = {m: min(policy.for_model(m).cpu_threads or node.gpus_per_node,
                      node.gpus_per_node) for m in replicas}
    facts = ModelFacts.of_lock(lock.models)
    # Ray exports counters every report interval: shorten it, and let each reading
    # settle past it (counters read mid-interval would miss the window's last part).
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    settle_s = 2.5 * int(os.environ["RAY_metrics_report_interval_ms"]) / 1e3
    settings, key = throwaway_key(settings.model_copy(update={"port": args.port, "grpc_port": 0}))
    metrics = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    body = {"prompt": "a lighthouse at dusk", "tier": args.tier}
    out = Path(tempfile.mkdtemp(prefix="imagegen-bench-capacity-"))  # locust's JSON
    rows: dict[float, list[tuple[float, float, int, int]]] = {}

    def drive(rate: float, duration: float, seed: int) -> tuple[list[float], int]:
        if args.driver == "locust":
            return _locust(base, key, args.tier, rate, duration, out)
        return asyncio.run(_poisson(url, key, body, rate, duration, seed))

    def inputs_at(rate: float, profiles=None, cpu_per_request_s: float = 0.0):
        pol = policy
        if profiles is not None:
            doc = policy.model_dump()
            doc["cluster"]["node_types"][node_key]["cpu_per_request_s"] = cpu_per_request_s
            pol = type(policy).model_validate(doc)
        f = dict(facts)
        if profiles is not None:
            f = {m: ModelFacts(x.width, x.height, x.steps, {**x.profiles, node_key: profiles[m]})
                 if m in profiles else x for m, x in facts.items()}
        return plan_inputs(pol, f, {args.tier: model}, {args.tier: rate}, {args.tier: 10.0},
                           service_cv=args.cv, overhead_s=overhead)

    try:
        base = local.start(settings)
        url = base + "/v1/images"
        drive(5, 3, 0)  # warm up

        def settled() -> dict:
            time.sleep(settle_s)
            return parse_metrics(_scrape(metrics))

        # 1. The stack's own latency: requests one at a time, minus their pipeline time.
        before = settled()
        lone = asyncio.run(_poisson(url, key, body, 2.0, 10.0, 1))[0]
        after = settled()
        busy = sum(v - before.get((n, labels), 0.0) for (n, labels), v in after.items()
                   if n == "imagegen_pipeline_busy_seconds_total")
        overhead = max(0.0, statistics.mean(lone) - busy / max(1, len(lone)))
        # 2. In place, at about half the capacity: first as the quiet profile predicts
        # it; again at half of what that window says when the guess was well past it.
        guess = 0.5 * _capacity(planner, inputs_at(1.0), model, replicas[model])
        d = lock.models[model].defaults
        for attempt in range(2):
            before = settled()
            # the stack this bench started: this machine's cores are its cores
            cpu0, t0 = host_busy_core_seconds(), time.monotonic()
            drive(guess, args.calibrate, 2 + attempt)
            cpu1, window = host_busy_core_seconds(), time.monotonic() - t0
            after = settled()
            cores_busy = (cpu1[1] - cpu0[1]) / window if cpu0 and cpu1 else None
            got = in_place(before, after, window, models={m: (replicas[m], threads[m])
                                                          for m in replicas},
                           cores=node.gpus_per_node, steps={m: lock.models[m].defaults.steps
                                                            for m in replicas},
                           cpu_cores_busy=cores_busy, device="cpu in place",
                           size={model: (d.width, d.height)})
            profiles = {model: got.profiles[model]}
            stack = got.cpu_per_request_s or 0.0
            capacity = _capacity(planner, inputs_at(1.0, profiles, stack), model,
                                 replicas[model])
            if guess <= 0.7 * capacity:
                break
            guess = 0.5 * capacity
        rates = args.rates or [round(f * capacity, 1) for f in args.fractions]
        print(f"\ncalibrated: stack latency {overhead * 1e3:.1f} ms per request; at "
              f"{guess:.1f} req/s the node's cores were {cores_busy or 0:.2f} busy, "
              f"{stack * 1e3:.1f} ms of core time per request outside the pipelines; "
              f"batches ran {got.slowdown[model]:.2f}x slower than quiet; capacity "
              f"{capacity:.1f} req/s")
        with tqdm(total=args.rounds * len(rates), desc="rounds x rates") as bar:
            for r in range(args.rounds):
                for rate in rates:
                    lat, fails = drive(rate, args.duration, 100 * r + int(rate))
                    rows.setdefault(rate, []).append(
                        (_pct(lat, 0.5), _pct(lat, 0.95), len(lat), fails))
                    bar.update()
    finally:
        local.stop()
    report = []
    for rate in rates:
        quiet = planner.performance(inputs_at(rate), model, replicas[model], gpu=node_key,
                                    rate_rps=rate)
        placed = planner.performance(inputs_at(rate, profiles, stack), model,
                                     replicas[model], gpu=node_key, rate_rps=rate)
        p95s = [x[1] for x in rows[rate]]
        report.append({
            "rate_rps": rate, "fraction": rate / capacity,
            "measured_p50_ms": statistics.median(x[0] for x in rows[rate]),
            "measured_p95_ms": statistics.median(p95s),
            "measured_p95_range_ms": [min(p95s), max(p95s)],
            "requests": sum(x[2] for x in rows[rate]), "failed": sum(x[3] for x in rows[rate]),
            "quiet_plan_p95_ms": quiet.p95_s * 1e3, "in_place_plan_p95_ms": placed.p95_s * 1e3,
        })
    print(f"\nimagegen bench capacity — {model}, {replicas[model]} replicas, open-loop "
          f"Poisson from {args.driver}, {args.rounds} rounds x {args.duration:g} s per rate\n")
    print(f"{'req/s':>6}{'of cap':>7}{'done':>6}{'fail':>5}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'p95 range':>13}{'quiet plan':>11}{'x':>6}{'in place':>9}{'x':>6}")
    for x in report:
        lo, hi = x["measured_p95_range_ms"]
        print(f"{x['rate_rps']:>6g}{x['fraction']:>7.0%}{x['requests']:>6}{x['failed']:>5}"
              f"{x['measured_p50_ms']:>8.1f}{x['measured_p95_ms']:>8.1f}"
              f"{f'{lo:.0f}-{hi:.0f}':>13}{x['quiet_plan_p95_ms']:>11.1f}"
              f"{x['measured_p95_ms'] / x['quiet_plan_p95_ms']:>6.2f}"
              f"{x['in_place_plan_p95_ms']:>9.1f}"
              f"{x['measured_p95_ms'] / x['in_place_plan_p95_ms']:>6.2f}")
    print("\nx: measured p95 / planned p95 (1.00 is a planner that matches)")
    if args.json:
        args.json.write_text(json.dumps({
            "model": model, "replicas": replicas[model], "driver": args.driver,
            "overhead_ms": overhead * 1e3, "cpu_per_request_ms": stack * 1e3,
            "capacity_rps": capacity, "calibration_slowdown": got.slowdown[model],
            "in_place_spmp": got.profiles[model].seconds_per_megapixel, "points": report,
        }, indent=2))
        print(f"wrote {args.json}")
    return 0


def _capacity(planner, inputs, model: str, replicas: int) -> float:
    """The highest rate the planner still finds stable (the model's saturation)."""
    lo, hi = 0.0, 1.0
    while planner.performance(inputs, model, replicas, gpu="cpu", rate_rps=hi).stable:
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if planner.performance(inputs, model, replicas, gpu="cpu", rate_rps=mid).stable:
            lo = mid
        else:
            hi = mid
    return lo
