"""`imagegen serve`: the local service until Ctrl-C (or SIGTERM).

The first signal stops it cleanly at any moment, start-up included; a second one
while it stops exits at once. A signal while Ray starts stops it at once: nothing has
been accepted yet, and ray.init holds the main thread in C for seconds (over ten on a
loaded machine) where no Python handler runs. It says which revisions are not ready and why, and
exits non-zero when no tier has a ready revision.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

from ..errors import ImagegenError
from .common import settings as settings_of

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM. A BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way (Ray's included) eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Phase:
    """Who answers the first signal: the main thread's handler (Stopped, a graceful
    stop) before Ray starts and once it serves; the watcher thread while Ray starts.
    Claimed under a lock, so exactly one of them acts on it."""

    def __init__(self) -> None:
        self.starting = False
        self._claimed = False
        self._pending: int | None = None
        # Re-entrant: the main thread's handler runs between any two bytecodes, so it
        # may claim while the main thread holds the lock (in end_start_up).
        self._lock = threading.RLock()

    def claim(self, starting: bool) -> bool:
        with self._lock:
            if self._claimed or self.starting != starting:
                return False
            self._claimed = True
            return True

    def hold(self, signum: int) -> None:
        """The main thread saw a signal while Ray starts: the watcher's to act on,
        unless start-up ends first (see end_start_up)."""
        self._pending = signum

    def end_start_up(self) -> int | None:
        """Start-up is over; a signal that arrived during it and nobody acted on."""
        with self._lock:
            self.starting = False
            if self._pending is None or self._claimed:
                return None
            self._claimed = True
            return self._pending


def _stop_handler(phase: _Phase):
    def handler(signum: int, _frame) -> None:
        if phase.starting:
            phase.hold(signum)
        elif phase.claim(starting=False):
            raise Stopped(signum)
    return handler


def _exit_now(signum: int, _frame) -> None:
    os._exit(128 + signum)  # Ray's processes share our fate (they die with us)


def _watch_start_up(phase: _Phase) -> None:
    """Signals reach this thread through the wakeup fd even while the main thread is
    inside a C call; while Ray starts, it stops everything at once."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            signum = os.read(r, 1)[0]
            if signum not in STOP_SIGNALS or not phase.claim(starting=True):
                continue
            try:
                # not print(): the main thread may hold stdout's lock; and a closed
                # pipe (`| tee`, killed by the same Ctrl-C) must not stop the stop
                with contextlib.suppress(OSError, ValueError):
                    os.write(sys.stdout.fileno(),
                             f"{signal.Signals(signum).name}: stopping...\n".encode())
                _kill_started()
            finally:
                os._exit(128 + signum)

    threading.Thread(target=watch, name="imagegen-signals", daemon=True).start()


def _kill_started() -> None:
    """Freeze every process Ray started so far (a frozen process starts no other),
    then kill them all: an agent whose raylet dies first would be left orphaned."""
    import psutil

    frozen: dict[int, psutil.Process] = {}
    while new := [p for p in psutil.Process().children(recursive=True)
                  if p.pid not in frozen]:
        for p in new:
            with contextlib.suppress(psutil.Error):
                p.suspend()
            frozen[p.pid] = p
    for p in frozen.values():
        with contextlib.suppress(psutil.Error):
            p.kill()


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
    phase = _Phase()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_handler(phase))
    _watch_start_up(phase)
    serving = False
    try:
        local.check_ports(settings)  # before anything slow
        if settings.build_missing and settings.engine == "diffusers":
            from ..tinymodels import build_missing

            build_missing(settings.lock_file, settings.model_dir)
        dev_key = _dev_key(settings)
        t0 = time.perf_counter()
        print("starting Ray and Serve (about 20 s)...", flush=True)
        phase.starting = True
        try:
            url = local.start(settings)
        except ImagegenError:
            raise
        except Exception as e:  # noqa: BLE001 -- Ray's own: one line, not a traceback
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"error: Ray Serve did not start ({type(e).__name__}: {first})",
                  file=sys.stderr)
            return 1
        if (held := phase.end_start_up()) is not None:
            raise Stopped(held)
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
