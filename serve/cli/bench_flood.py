"""`imagegen bench flood`: N draft requests at once against the local stack, more
than the draft revision's queue holds. The ones it cannot queue must be refused
quickly (503 `overloaded`) while the admitted ones complete and the service stays
ready. Beside it, the floor: the same flood of requests naming no tier, the
cheapest answer past authentication (422), so a 503's latency reads against what
any answer costs here. Prints the outcome and latency per status side by side;
timings are printed, never asserted."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=700, help="requests sent at once")
    p.add_argument("--tier", default="draft")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


@dataclass
class Outcome:
    status: int
    code: str
    count: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    retry_after: list[str]


async def flood(url: str, key: str, body: dict, n: int, readyz: str
                ) -> tuple[list[tuple[int, str, float, str | None]], list[int]]:
    """Send n requests at once on n connections; (status, code, seconds, Retry-After)
    per request, and /readyz's status sampled every 100 ms meanwhile."""
    import aiohttp

    from .bench import fresh_seeds

    first = fresh_seeds(1).start  # every request a cache miss
    bar = tqdm(total=n, desc=f"flood of {n}", leave=False)
    results: list[tuple[int, str, float, str | None]] = []
    ready: list[int] = []
    start = asyncio.Event()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        await start.wait()
        t = time.perf_counter()
        async with session.post(url, json={**body, "seed": first + i}) as r:
            try:
                data = await r.json()
                code = "ok" if r.status == 200 else data["error"]["code"]
            except (aiohttp.ContentTypeError, ValueError, KeyError, TypeError):
                code = "not_json"  # e.g. a proxy's plain-text answer
            results.append((r.status, code, time.perf_counter() - t, r.headers.get("Retry-After")))
        bar.update()

    async def probe(session: aiohttp.ClientSession, done: asyncio.Event) -> None:
        while not done.is_set():
            async with session.get(readyz) as r:
                ready.append(r.status)
            await asyncio.sleep(0.1)

    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout,
                                     headers={"Authorization": f"Bearer {key}"}) as session:
        tasks = [asyncio.create_task(one(session, i)) for i in range(n)]
        done = asyncio.Event()
        prober = asyncio.create_task(probe(session, done))
        await asyncio.sleep(0.5)  # every task waits at the start line
        start.set()
        await asyncio.gather(*tasks)
        done.set()
        await prober
    bar.close()
    return results, ready


def _pick(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarise(results: list[tuple[int, str, float, str | None]]) -> list[Outcome]:
    groups: dict[tuple[int, str], list[tuple[float, str | None]]] = defaultdict(list)
    for status, code, s, retry in results:
        groups[(status, code)].append((s, retry))
    out = []
    for (status, code), rows in sorted(groups.items()):
        lat = sorted(s * 1e3 for s, _ in rows)
        out.append(Outcome(status, code, len(rows), _pick(lat, 0.5), _pick(lat, 0.95), lat[-1],
                           sorted({r for _, r in rows if r})))
    return out


def run(args: argparse.Namespace, settings) -> int:
    from .. import local
    from ..tinymodels import build_missing
    from .bench import throwaway_key

    build_missing(settings.lock_file, settings.model_dir)
    from autoscaling.policies import load_policy

    from ..lockfile import load_lock
    from ..routing import load_routing

    model = load_routing(settings.routing_file, load_lock(settings.lock_file)).route(args.tier).model
    queue = load_policy(settings.policy_file).for_model(model).max_queued_requests
    settings, key = throwaway_key(settings.model_copy(update={
        "port": args.port, "grpc_port": 0, "engine": "diffusers"}))
    base = local.start(settings)
    try:
        body = {"prompt": "a lighthouse at dusk", "tier": args.tier}
        asyncio.run(flood(base + "/v1/images", key, body, 8, base + "/readyz"))  # warm up
        results, ready = asyncio.run(
            flood(base + "/v1/images", key, body, args.requests, base + "/readyz"))
        floor, _ = asyncio.run(flood(base + "/v1/images", key, {**body, "tier": "no-such-tier"},
                                     args.requests, base + "/readyz"))
    finally:
        local.stop()
    rows = summarise(results)
    floor_rows = summarise(floor)
    print(f"\nimagegen bench flood — {args.requests} {args.tier} requests at once; {model}: "
          f"queue limit {queue} (max_queued_requests)\n")
    print(f"{'status':<8}{'code':<14}{'count':>7}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}"
          "  Retry-After")
    for r in rows + floor_rows:
        print(f"{r.status:<8}{r.code:<14}{r.count:>7}{r.p50_ms:>10.1f}{r.p95_ms:>10.1f}"
              f"{r.max_ms:>10.1f}  {','.join(r.retry_after) or '-'}")
    print("(unknown_tier: the floor, a flood of requests naming no tier)")
    refused = [r for r in rows if r.code == "overloaded"]
    served = [r for r in rows if r.status == 200]
    not_ready = sum(1 for s in ready if s != 200)
    print(f"\n/readyz during the flood: {len(ready) - not_ready} x 200, {not_ready} other")
    if refused and served:
        print(f"503 p95 / 200 p50: {refused[0].p95_ms / served[0].p50_ms:.3f}; 503 p95 / floor "
              f"p95: {refused[0].p95_ms / floor_rows[0].p95_ms:.2f} (target: 503 p95 under "
              f"100 ms: {refused[0].p95_ms:.1f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"requests": args.requests, "queue": queue, "outcomes": [asdict(r) for r in rows],
             "floor": [asdict(r) for r in floor_rows],
             "readyz": {"ok": len(ready) - not_ready, "other": not_ready}}, indent=2))
    return 0
