"""`imagegen bench state`: what the state store costs a request on each backend,
side by side: authenticate (a key looked up in the store, as the first call per key
and every call after the cache's TTL; and from the authenticator's cache), and the
budget's reserve + commit pair."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="also measure this Redis: a redis-server "
                   "(redis://HOST:PORT/0) or a Redis Cluster (redis+cluster://HOST:PORT)")
    p.add_argument("--keys", type=int, default=2000, help="distinct keys looked up")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


async def _measure(url: str, keys: int) -> dict[str, float]:
    from ..quotas.auth import Authenticator
    from ..quotas.keys import open_keys
    from ..quotas.ledger import Budget, open_ledger
    from ..quotas.principals import new_key, record_for

    store = open_keys(url)
    made = [new_key() for _ in range(keys)]
    for key_id, key in tqdm(made, desc=f"adding {keys} keys", leave=False):
        await store.add(record_for(key, key_id, f"p-{key_id}"))
    auth = Authenticator(store)
    cold, warm = [], []
    for _, key in tqdm(made, desc="authenticating", leave=False):
        for out in (cold, warm):  # first through the store, then from the cache
            t = time.perf_counter()
            await auth.authenticate(f"Bearer {key}")
            out.append(time.perf_counter() - t)
    await store.close()
    ledger = open_ledger(url)
    budget = Budget(burst=1e9, refill_per_s=1e6, daily=None)
    spend = []
    for key_id, _ in tqdm(made, desc="reserve + commit", leave=False):
        t = time.perf_counter()
        got = await ledger.reserve(f"p-{key_id}", 1.0, budget)
        await ledger.commit(got.reservation)
        spend.append(time.perf_counter() - t)
    await ledger.close()
    q = statistics.quantiles
    return {"auth p50 ms": statistics.median(cold) * 1e3, "auth p95 ms": q(cold, n=20)[-1] * 1e3,
            "cached p50 ms": statistics.median(warm) * 1e3,
            "budget p50 ms": statistics.median(spend) * 1e3,
            "budget p95 ms": q(spend, n=20)[-1] * 1e3}


def run(args: argparse.Namespace, settings) -> int:
    backends = {"sqlite": f"sqlite://{tempfile.mkdtemp(prefix='imagegen-bench-')}/state.db"}
    if args.redis_url:
        backends["redis-cluster" if "+cluster://" in args.redis_url else "redis"] = \
            args.redis_url
    rows = {name: asyncio.run(_measure(url, args.keys)) for name, url in backends.items()}
    cols = list(next(iter(rows.values())))
    print(f"\nimagegen bench state — authenticate and reserve + commit, {args.keys} "
          "principals (target: p50 < 1 ms each)\n")
    print(f"{'backend':<14}" + "".join(f"{c:>16}" for c in cols))
    for name, r in rows.items():
        print(f"{name:<14}" + "".join(f"{r[c]:>16.3f}" for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps({"keys": args.keys, "backends": rows}, indent=2))
    return 0
