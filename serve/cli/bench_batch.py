"""`imagegen bench batch`: does batch yield to interactive traffic? Interactive p95
under open-loop Poisson arrivals alone, then with a batch flooding the same
revision (the workers claiming only below `batch_yield_at`), then with the yield off;
the batch's own throughput alone and beside the interactive load; and how long a
cancel takes to leave nothing running. Side by side in one run (targets: p95 with a
batch <= 1.2x alone; quiet within 2 s of a cancel). It prints, it never asserts."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

NO_YIELD = 1_000_000  # batch_yield_at no interactive load reaches


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tier", default="draft")
    p.add_argument("--rate", type=float, default=8.0, help="interactive requests per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per point")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--items", type=int, default=1000, help="items in each flooding batch")
    p.add_argument("--batch-concurrency", type=int, help="items each ingress runs at once "
                   "(default: the setting's)")
    p.add_argument("--yield-at", type=int, help="batch_yield_at (default: the setting's)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


def run(args: argparse.Namespace, settings) -> int:
    from .. import local
    from ..tinymodels import build_missing
    from .bench import throwaway_key

    build_missing(settings.lock_file, settings.model_dir)
    settings = settings.model_copy(update={k: v for k, v in (
        ("batch_concurrency", args.batch_concurrency), ("batch_yield_at", args.yield_at))
        if v is not None})
    rows: dict[str, dict] = {}
    for yield_at in (settings.batch_yield_at, NO_YIELD):
        stack, key = throwaway_key(settings.model_copy(update={
            "port": args.port, "grpc_port": 0, "engine": "diffusers",
            "batch_yield_at": yield_at, "batch_max_items": max(args.items, 1)}))
        base = local.start(stack)
        try:
            rows |= asyncio.run(_points(base, key, args, yielding=yield_at != NO_YIELD))
        finally:
            local.stop()
    _print(rows, args, settings)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


async def _points(base: str, key: str, args, *, yielding: bool) -> dict[str, dict]:
    """With the yield: `rounds` interleaved pairs (alone, beside a batch), medians of
    each; then the batch alone. Without it: the rounds beside a batch only."""
    import httpx

    body = {"prompt": "a lighthouse at dusk", "tier": args.tier}
    rows: dict[str, list[dict]] = {}
    async with httpx.AsyncClient(base_url=base, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"}) as c:
        load = _Load(base + "/v1/images", key, body, args)
        await load.run(3)  # warm the handles and the replica
        beside = "interactive + batch" + ("" if yielding else ", no yield")
        for r in range(args.rounds):
            if yielding:
                rows.setdefault("interactive alone", []).append(
                    _latency(await load.run(args.duration)))
            rows.setdefault(beside, []).append(await _beside(c, load, args, f"{yielding}{r}"))
        if yielding:
            batch = await _flood(c, args, "alone")
            t0, before = time.perf_counter(), await _done(c, batch)
            await asyncio.sleep(args.duration)
            rows["batch alone"] = [{"items_per_s": (await _done(c, batch) - before)
                                    / (time.perf_counter() - t0)}]
            await c.post(f"/v1/batches/{batch}/cancel")
            await _quiet(c, batch)
    return {name: _median(points) for name, points in rows.items()}


class _Load:
    def __init__(self, url: str, key: str, body: dict, args) -> None:
        self.url, self.key, self.body, self.rate = url, key, body, args.rate
        self.seed = 0

    async def run(self, duration: float) -> list[float]:
        from .bench_capacity import _poisson

        self.seed += 1
        lat, _ = await _poisson(self.url, self.key, self.body, self.rate, duration, self.seed)
        return lat


async def _beside(c, load: _Load, args, tag: str) -> dict:
    """Interactive load beside a flooding batch, then the batch's cancel."""
    batch = await _flood(c, args, f"beside{tag}")
    await asyncio.sleep(2)  # the workers have claimed
    t0, before = time.perf_counter(), await _done(c, batch)
    point = _latency(await load.run(args.duration))
    point["items_per_s"] = (await _done(c, batch) - before) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    await c.post(f"/v1/batches/{batch}/cancel")
    point["cancel_answer_ms"] = (time.perf_counter() - t0) * 1e3
    await _quiet(c, batch)
    point["cancel_quiet_ms"] = (time.perf_counter() - t0) * 1e3
    return point


def _median(points: list[dict]) -> dict:
    import statistics

    out = {k: statistics.median(p[k] for p in points) for k in points[0]}
    if len(points) > 1 and "p95_ms" in out:
        out["p95_ms_rounds"] = [round(p["p95_ms"], 1) for p in points]
    return out


def _latency(lat: list[float]) -> dict:
    from .bench import _pct

    return {"requests": len(lat), "p50_ms": _pct(lat, 0.5), "p95_ms": _pct(lat, 0.95)}


async def _flood(c, args, tag: str) -> str:
    from .bench import fresh_seeds

    seeds = fresh_seeds(args.items)
    r = await c.post("/v1/batches", json={"requests": [
        {"prompt": f"a lighthouse at dusk, variant {i}", "tier": args.tier, "seed": s}
        for i, s in enumerate(seeds)], "id": f"bench_{tag}_{seeds.start}"})
    r.raise_for_status()
    return r.json()["id"]


async def _done(c, batch: str) -> int:
    return (await c.get(f"/v1/batches/{batch}")).json()["counts"]["succeeded"]


async def _quiet(c, batch: str, deadline_s: float = 60) -> float:
    """Seconds until the batch has nothing leased (its items in flight ended)."""
    t0 = time.perf_counter()
    while (await c.get(f"/v1/batches/{batch}")).json()["counts"]["leased"]:
        if time.perf_counter() - t0 > deadline_s:
            break
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


def _print(rows: dict[str, dict], args, settings) -> None:
    alone = rows["interactive alone"]["p95_ms"]
    print(f"\nimagegen bench batch — tier {args.tier}, interactive open-loop Poisson at "
          f"{args.rate:g} req/s, {args.duration:g} s per point, medians of {args.rounds} "
          "interleaved rounds; batch_concurrency "
          f"{settings.batch_concurrency}, batch_yield_at {settings.batch_yield_at}\n")
    print(f"{'point':<30}{'p50 ms':>8}{'p95 ms':>8}{'p95 x alone':>12}{'batch items/s':>15}"
          f"{'cancel ms':>11}{'quiet ms':>10}")
    for name, r in rows.items():
        p95 = r.get("p95_ms")
        cells = [f"{r['p50_ms']:>8.1f}" if "p50_ms" in r else f"{'':>8}",
                 f"{p95:>8.1f}" if p95 is not None else f"{'':>8}",
                 f"{p95 / alone:>12.2f}" if p95 is not None else f"{'':>12}",
                 f"{r['items_per_s']:>15.1f}" if "items_per_s" in r else f"{'':>15}",
                 f"{r['cancel_answer_ms']:>11.1f}" if "cancel_answer_ms" in r else f"{'':>11}",
                 f"{r['cancel_quiet_ms']:>10.1f}" if "cancel_quiet_ms" in r else f"{'':>10}"]
        print(f"{name:<30}" + "".join(cells))
    for name, r in rows.items():
        if "p95_ms_rounds" in r:
            print(f"  {name}: p95 per round {r['p95_ms_rounds']} ms")
    print("\ntargets: p95 with a batch <= 1.2x alone; nothing running within 2 s of a "
          "cancel (quiet ms)")
