"""`imagegen serve`: the local service until Ctrl-C (or SIGTERM).

The first signal stops it cleanly at any moment, start-up included; a second one
while it stops exits at once. It says which revisions are not ready and why, and
exits non-zero when no tier has a ready revision.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from .common import settings as settings_of

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM. A BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way (Ray's included) eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


def _exit_now(signum: int, _frame) -> None:
    os._exit(128 + signum)  # Ray's processes share our fate (they die with us)


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="run the local service (Ray + Serve) until Ctrl-C")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default 8000)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 9000; 0: no gRPC)")
    s.add_argument("--metrics-port", type=int, help="Ray's /metrics port (default 8080)")
    s.add_argument("--engine", choices=["diffusers", "fake"])
    s.add_argument("--threads", type=int, help="torch threads per CPU replica")
    return s


def run(args: argparse.Namespace) -> int:
    from .. import local

    settings = settings_of(args)
    # Our handlers from the first moment: a process started with SIGINT ignored
    # (a background job of a non-interactive shell) never gets Python's
    # KeyboardInterrupt, and the default SIGTERM would skip stopping Ray.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)
    serving = False
    try:
        local.check_ports(settings)  # before anything slow
        if settings.build_missing and settings.engine == "diffusers":
            from ..tinymodels import build_missing

            build_missing(settings.lock_file, settings.model_dir)
        dev_key = _dev_key(settings)
        t0 = time.perf_counter()
        print("starting Ray and Serve (about 20 s)...", flush=True)
        url = local.start(settings)
        if not _summary(local.readiness(url), url, time.perf_counter() - t0, settings):
            return 1
        if dev_key:
            print(dev_key, flush=True)
        serving = True
        while True:
            signal.pause()
    except Stopped as e:
        print(f"{e}: stopping...", flush=True)
        return 0 if serving else 128 + e.signum
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _exit_now)
        local.stop()


def _dev_key(settings) -> str | None:
    """The line about the local development key: made and printed on first run."""
    import asyncio

    from ..quotas.keys import dev_key_file, ensure_dev_key

    made = asyncio.run(ensure_dev_key(settings.state_url))
    if made is None:
        return None
    key, new = made
    where = dev_key_file(settings.state_url)
    if new:
        return (f"  dev API key (made now, kept in {where}; imagegen generate uses it):\n"
                f"    Authorization: Bearer {key}")
    return f"  dev API key: in {where}"


def _summary(ready: dict[str, Any], url: str, took_s: float, settings) -> bool:
    """Print what serves and what does not (the /readyz body); False when no tier
    has a ready revision."""
    tiers, models = ready["tiers"], ready["models"]
    down = sorted(n for n, m in models.items() if m["tiers"] and not m["ready"])
    serving = [t for t, ok in tiers.items() if ok]
    if not serving:
        print(f"error: no tier has a ready revision after {took_s:.0f} s; stopping",
              file=sys.stderr)
    elif down:
        print(f"imagegen serving in {took_s:.0f} s at {url}, but {len(down)} primary "
              f"revision(s) NOT READY: {', '.join(down)}", flush=True)
    else:
        print(f"imagegen ready in {took_s:.0f} s at {url}", flush=True)
    for name, m in models.items():
        role = ",".join(m["tiers"]) or (f"backs {','.join(m['backs'])}" if m["backs"]
                                         else "(no tier)")
        state = "ready" if m["ready"] else f"NOT READY: {m['reason']}"
        print(f"  {role:<18} {name:<16} {state}", flush=True)
    for tier in sorted(set(tiers) - set(serving)):
        print(f"  tier {tier}: nothing ready to serve it", flush=True)
    if not serving:
        return False
    host = url.rsplit(":", 1)[0]
    if settings.grpc_port:
        print(f"  gRPC: {host.split('//')[1]}:{settings.grpc_port} (imagegen.v1.Images, "
              "grpc.health.v1, reflection)", flush=True)
    print(f"  metrics: {host}:{settings.metrics_port}/metrics", flush=True)
    print(f"  try: imagegen generate 'a red fox' --url {url} -o fox.png", flush=True)
    return True
