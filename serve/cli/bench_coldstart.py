"""`imagegen bench coldstart`: how long until the service serves, side by side in one
run. (1) `imagegen serve` as a new process, from spawn to the first /healthz 200 and
/readyz 200 (and the stop after SIGINT), median of `--runs`. (2) Each models.lock
revision on disk loaded by DiffusersEngine in this process, cold (its files dropped
from the page cache first, posix_fadvise DONTNEED) and hot (median of `--loads`),
against the bound its bytes on disk set at the read bandwidth of the filesystem
holding the models, itself measured both ways on a `--probe-mb` temporary file:
cold (dropped from the cache before reading) and hot (read again from the cache).
Where DONTNEED is not honoured (tmpfs, some overlays) cold reads as hot: the table
says which figure is which, never which one the kernel gave. Printed, never asserted."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 4 << 20  # read size of the bandwidth probe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="`imagegen serve` starts (median)")
    p.add_argument("--loads", type=int, default=5, help="hot loads per model (median)")
    p.add_argument("--probe-mb", type=int, default=256,
                   help="size of the read-bandwidth probe file, MiB")
    p.add_argument("--skip-serve", action="store_true", help="only the model loads")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--grpc-port", type=int, default=9123, help="0: no gRPC")
    p.add_argument("--metrics-port", type=int, help="Ray's /metrics port of the started "
                   "service (default: the setting's)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


@dataclass
class StartRow:
    run: int
    to_starting_s: float  # spawn -> "starting Ray and Serve" (imports, checks, dev key)
    to_healthz_s: float  # spawn -> first /healthz 200 (the ingress answers)
    to_readyz_s: float  # spawn -> first /readyz 200 (every primary revision ready)
    stop_s: float  # SIGINT -> the process exited


@dataclass
class LoadRow:
    model: str
    bytes: int
    cold_s: float
    hot_s: float  # median of `loads`
    bound_cold_s: float  # bytes / cold read bandwidth
    bound_hot_s: float  # bytes / page-cache read bandwidth


def drop_cache(path: Path) -> None:
    """Ask the kernel to drop `path`'s clean pages (dirty ones are written first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
    return n


def read_bandwidth(folder: Path, mib: int) -> tuple[float, float]:
    """(cold, hot) bytes/s reading a `mib` MiB file in `folder`: cold after dropping it
    from the page cache, hot right after."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".imagegen-bw-", dir=folder)
    path = Path(name)
    try:
        block = os.urandom(CHUNK)  # incompressible: no filesystem shortcut
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, mib * (1 << 20) // CHUNK)):
                f.write(block)
        out = []
        for cold in (True, False):
            if cold:
                drop_cache(path)
            t = time.perf_counter()
            n = _read_all(path)
            out.append(n / (time.perf_counter() - t))
        return out[0], out[1]
    finally:
        path.unlink(missing_ok=True)


def model_files(entry, model_dir: Path) -> list[Path] | None:
    """The revision's files on disk, or None when any is missing (not built/fetched)."""
    root = entry.local_dir(model_dir)
    paths = [root / rel for rel in entry.files]
    return paths if all(p.is_file() for p in paths) else None


def _load_once(entry, settings, threads: int) -> float:
    from ..engines.diffusers_engine import DiffusersEngine
    from .bench import engine_spec

    spec = engine_spec(entry, settings, threads)
    engine = DiffusersEngine(spec)
    t = time.perf_counter()
    engine.load()
    took = time.perf_counter() - t
    del engine
    return took


def bench_loads(lock, settings, loads: int, bw: tuple[float, float]
                ) -> tuple[list[LoadRow], list[str]]:
    threads = len(os.sched_getaffinity(0))
    rows, skipped = [], []
    for entry in lock.models.values():
        if (paths := model_files(entry, settings.model_dir)) is None:
            skipped.append(entry.name)
            continue
        try:
            _load_once(entry, settings, threads)  # first use in this process: lazy imports
        except RuntimeError:
            skipped.append(entry.name)  # files present but not loadable (e.g. a broken one)
            continue
        for p in paths:
            drop_cache(p)
        cold = _load_once(entry, settings, threads)
        hot = statistics.median(_load_once(entry, settings, threads) for _ in range(loads))
        size = sum(p.stat().st_size for p in paths)
        rows.append(LoadRow(entry.name, size, cold, hot, size / bw[0], size / bw[1]))
    return rows, skipped


def import_seconds() -> float:
    """`import torch, diffusers` in a new interpreter: what every replica pays first."""
    code = ("import time; t = time.perf_counter(); import torch, diffusers; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def _get_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_once(run: int, argv: list[str], env: dict[str, str], url: str,
               deadline_s: float = 300) -> StartRow:
    """Spawn `imagegen serve`, time its milestones, SIGINT it, time the stop."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # killed as a group
    lines: list[str] = []
    starting: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if not starting and line.startswith("starting Ray and Serve"):
                starting.append(time.perf_counter() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    healthz = readyz = None
    try:
        while readyz is None:
            if proc.poll() is not None or time.perf_counter() - t0 > deadline_s:
                tail = " | ".join(lines[-5:])
                raise RuntimeError(f"imagegen serve not ready (exit {proc.returncode}): {tail}")
            if healthz is None and _get_ok(url + "/healthz"):
                healthz = time.perf_counter() - t0
            if healthz is not None and _get_ok(url + "/readyz"):
                readyz = time.perf_counter() - t0
            time.sleep(0.05)
        t = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        stop = time.perf_counter() - t
    finally:
        if proc.poll() is None:  # with Ray's processes, which would keep the ports
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)
    return StartRow(run, starting[0] if starting else float("nan"), healthz, readyz, stop)


def bench_starts(args, settings) -> list[StartRow]:
    state = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    # A throwaway state store and image store: the service makes a dev key on start.
    env = {**os.environ, "IMAGEGEN_STATE_URL": f"sqlite://{state / 'state.db'}",
           "IMAGEGEN_STORAGE_URL": f"file://{state / 'images'}", "XDG_STATE_HOME": str(state)}
    metrics = args.metrics_port or settings.metrics_port
    argv = [sys.executable, "-m", "serve.cli", "serve", "--port", str(args.port),
            "--grpc-port", str(args.grpc_port), "--metrics-port", str(metrics),
            "--engine", "diffusers"]
    if settings.threads:
        argv += ["--threads", str(settings.threads)]
    ports = settings.model_copy(update={"port": args.port, "grpc_port": args.grpc_port,
                                        "metrics_port": metrics})
    rows = []
    for r in range(args.runs):
        _wait_free(ports)
        rows.append(start_once(r, argv, env, f"http://{settings.host}:{args.port}"))
    return rows


def _wait_free(settings, deadline_s: float = 60) -> None:
    """Until every port of the service is free (the last run's replicas may linger)."""
    from .. import local
    from ..errors import ConfigError

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            local.check_ports(settings)
            return
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _report(starts: list[StartRow], loads: list[LoadRow], skipped: list[str],
            bw: tuple[float, float], imports: float, probe_mb: int) -> dict:
    figures: dict = {"read_bandwidth_mb_s": {"cold": bw[0] / 1e6, "hot": bw[1] / 1e6},
                     "probe_mb": probe_mb, "import_torch_diffusers_s": imports}
    if starts:
        med = {k: statistics.median(getattr(s, k) for s in starts)
               for k in ("to_starting_s", "to_healthz_s", "to_readyz_s", "stop_s")}
        figures["serve"] = {"runs": [asdict(s) for s in starts], "median": med}
        print(f"\nimagegen bench coldstart — `imagegen serve` as a new process, median of "
              f"{len(starts)} run(s), seconds from spawn\n")
        print(f"{'milestone':<44}{'s':>8}")
        for label, k in (("imports, checks, dev key (\"starting Ray\")", "to_starting_s"),
                         ("ingress answers (/healthz 200)", "to_healthz_s"),
                         ("every primary revision ready (/readyz 200)", "to_readyz_s"),
                         ("stop after SIGINT (from the signal)", "stop_s")):
            print(f"{label:<44}{med[k]:>8.2f}")
    print(f"\nmodel load in this process (DiffusersEngine.load) against bytes / read "
          f"bandwidth; bandwidth on a {probe_mb} MiB file beside the models: cold (dropped "
          f"from the page cache) {bw[0] / 1e6:.0f} MB/s, hot (page cache) {bw[1] / 1e6:.0f} "
          f"MB/s; import torch + diffusers in a new process {imports:.2f} s\n")
    print(f"{'model':<14}{'MB':>8}{'cold s':>9}{'hot s':>9}{'bound cold s':>14}"
          f"{'bound hot s':>13}{'cold x bound':>14}{'hot x bound':>13}")
    figures["loads"] = []
    for r in loads:
        row = asdict(r) | {"cold_x_bound": r.cold_s / r.bound_cold_s,
                           "hot_x_bound": r.hot_s / r.bound_hot_s}
        figures["loads"].append(row)
        print(f"{r.model:<14}{r.bytes / 1e6:>8.2f}{r.cold_s:>9.3f}{r.hot_s:>9.3f}"
              f"{r.bound_cold_s:>14.4f}{r.bound_hot_s:>13.5f}{row['cold_x_bound']:>14.1f}"
              f"{row['hot_x_bound']:>13.1f}")
    if skipped:
        print(f"(not on disk or not loadable here, skipped: {', '.join(skipped)})")
    figures["skipped"] = skipped
    return figures


def run(args: argparse.Namespace, settings) -> int:
    from ..lockfile import load_lock
    from ..tinymodels import build_missing

    if args.runs < 1 or args.loads < 1 or args.probe_mb < 1:
        print("--runs, --loads and --probe-mb must be at least 1")
        return 2
    build_missing(settings.lock_file, settings.model_dir)
    lock = load_lock(settings.lock_file)
    starts = [] if args.skip_serve else bench_starts(args, settings)
    imports = import_seconds()
    bw = read_bandwidth(Path(settings.model_dir), args.probe_mb)
    loads, skipped = bench_loads(lock, settings, args.loads, bw)
    figures = _report(starts, loads, skipped, bw, imports, args.probe_mb)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0
