"""`imagegen bench cache`: an identical request answered from the store against a
miss, through the whole local stack, side by side in one run (targets: hit p50 <= 5
ms, and <= 1/10 of a miss on the tiny draft model), as base64 and as a URL. Timings
are printed, never asserted."""

from __future__ import annotations

import argparse
import asyncio
import json
from functools import partial
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=100, help="requests per point")
    p.add_argument("--tier", default="draft")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


def run(args: argparse.Namespace, settings) -> int:
    from .. import local
    from ..tinymodels import build_missing
    from .bench import _load, _pct, throwaway_key

    build_missing(settings.lock_file, settings.model_dir)
    stack, key = throwaway_key(settings.model_copy(update={
        "port": args.port, "grpc_port": 0, "engine": "diffusers"}))
    base = local.start(stack)
    rows = {}
    try:
        load = partial(_load, base + "/v1/images", key)
        body = {"prompt": "a lighthouse at dusk", "tier": args.tier}
        asyncio.run(load(body, 10, 1))  # warm the handles and the replica
        for name, extra in (("miss (new seed)", {}),
                            ("hit, b64_json", {"seed": 4242}),
                            ("hit, url", {"seed": 4243, "response_format": "url"})):
            if extra:
                asyncio.run(load({**body, **extra}, 1, 1))  # the first one generates
            lat, _, batches = asyncio.run(load({**body, **extra}, args.requests, 1))
            rows[name] = {"p50_ms": _pct(lat, 0.5), "p95_ms": _pct(lat, 0.95),
                          "model_calls": sum(1 for b in batches if b)}
    finally:
        local.stop()
    miss = rows["miss (new seed)"]["p50_ms"]
    print(f"\nimagegen bench cache — POST /v1/images, tier {args.tier}, {args.requests} "
          "requests per point at c=1, one principal\n")
    print(f"{'point':<18}{'p50 ms':>9}{'p95 ms':>9}{'x miss':>9}{'model calls':>13}")
    for name, r in rows.items():
        r["ratio_to_miss"] = r["p50_ms"] / miss
        print(f"{name:<18}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['ratio_to_miss']:>9.3f}"
              f"{r['model_calls']:>13}")
    print("\ntargets: a hit's p50 <= 5 ms and <= 0.1x a miss's")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
