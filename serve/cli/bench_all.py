"""`imagegen bench all`: every benchmark in turn, each in its own process (each starts
and stops its own Ray), its JSON and its output collected in one folder (`--out`),
one summary line per benchmark, and a non-zero exit when any failed. `--quick` runs
each with its reduced settings (QUICK): the same code paths, fewer requests and
shorter windows; figures for checking the tool, not for quoting. Not in the lot:
`bench serve --peers` (it needs its own venv, made with the network) and
NOT_IN_SUITE."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Every benchmark, cheapest first, and the flags of its reduced run.
QUICK: dict[str, tuple[str, ...]] = {
    "policy": ("--terms", "1000", "--prompts", "200"),
    "state": ("--keys", "200"),
    "encode": ("--repeats", "2", "--skip-knobs"),
    # The stack's curve is one more stack start; `serve` measures the stack already.
    "batching": ("--calls", "4", "--sizes", "1", "2", "4", "8", "--skip-stack"),
    "coldstart": ("--runs", "1", "--loads", "2", "--probe-mb", "64"),
    "naive": ("--requests", "16", "--rounds", "1"),
    "serve": ("--requests", "16", "--concurrency", "1", "16"),
    "cache": ("--requests", "10"),
    "flood": ("--requests", "100"),
    "safety": ("--calls", "3", "--requests", "8"),
    "batch": ("--duration", "3", "--rounds", "1", "--items", "40", "--rate", "4"),
    # Calibration needs a few batches of each size to read a profile in place.
    "capacity": ("--driver", "aiohttp", "--rounds", "1", "--fractions", "0.5",
                 "--duration", "5", "--calibrate", "10"),
}
# Benchmarks `bench all` does not run, and why (every other one must be in QUICK).
NOT_IN_SUITE = {"gpu": "needs a CUDA device and its own time box: run it on its own"}
# Which port flags each benchmark takes (the rest start no server).
PORT_FLAGS: dict[str, tuple[str, ...]] = {
    "serve": ("--port", "--grpc-port"), "safety": ("--port",), "coldstart":
    ("--port", "--grpc-port", "--metrics-port"), "naive": ("--port",),
    "batching": ("--port",), "cache": ("--port",), "flood": ("--port",),
    "batch": ("--port",), "capacity": ("--port",),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="each benchmark's reduced run")
    p.add_argument("--out", type=Path, default=Path(".bench"),
                   help="folder for <name>.json, <name>.log and summary.json")
    p.add_argument("--only", nargs="+", choices=list(QUICK), metavar="NAME",
                   help=f"just these, in the usual order ({', '.join(QUICK)})")
    p.add_argument("--skip", nargs="+", choices=list(QUICK), default=[], metavar="NAME",
                   help="all but these")
    p.add_argument("--port", type=int, default=8123, help="HTTP port of every stack")
    p.add_argument("--grpc-port", type=int, default=9123, help="gRPC port where one is served")
    p.add_argument("--metrics-port", type=int,
                   help="Ray's /metrics port of every stack (default: the setting's)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")


@dataclass
class Outcome:
    name: str
    rc: int
    seconds: float
    json: str | None  # None: no JSON written
    log: str
    summary: str  # headline figures, or why it failed


def selected(only: list[str] | None, skip: list[str]) -> list[str]:
    """The benchmarks to run, in QUICK's order."""
    return [n for n in QUICK if (only is None or n in only) and n not in skip]


def command(name: str, args: argparse.Namespace, json_path: Path) -> list[str]:
    """The child's argv: `imagegen [--config C] bench NAME --json P [quick] [ports]`."""
    argv = [sys.executable, "-m", "serve.cli"]
    if getattr(args, "config", None):
        argv += ["--config", str(args.config)]
    argv += ["bench", name, "--json", str(json_path)]
    if args.quick:
        argv += QUICK[name]
    for flag in PORT_FLAGS.get(name, ()):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv


def numbers(value) -> list[float]:
    """Every number in a JSON document (bools excluded)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return []


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else str(x)


def headline(name: str, data: dict) -> str:
    """One line of the figures a reader looks at first; the count of figures for a
    benchmark without a headline (or a JSON of an unexpected shape)."""
    try:
        return _HEADLINES[name](data)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return f"{len(numbers(data))} figures"


def _serve(d: dict) -> str:
    r = d["ratios"]
    tput = max((k for k in r if k.startswith("throughput_ratio_c")),
               key=lambda k: int(k.rsplit("c", 1)[1]))
    return (f"HTTP {_fmt(r['added_p50_ms_c1'], '+.1f')} ms at c=1, "
            f"{_fmt(r[tput], '.2f')}x in-process at c={tput.rsplit('c', 1)[1]}")


def _naive(d: dict) -> str:
    parts = []
    for row in d["rows"][1:]:
        parts.append(f"{row['system']} {_fmt(row['added_ms']['median'], '+.1f')} ms / "
                     f"{_fmt(row['ratio']['median'], '.2f')}x")
    return "; ".join(parts) + " (c=1 added / c=16 x in-process batched)"


def _coldstart(d: dict) -> str:
    out = []
    if "serve" in d:
        out.append(f"spawn to /readyz {_fmt(d['serve']['median']['to_readyz_s'], '.1f')} s")
    out += [f"{r['model']} load {_fmt(r['cold_s'], '.2f')} s cold "
            f"({_fmt(r['cold_x_bound'], '.0f')}x bound)" for r in d["loads"]]
    return "; ".join(out)


def _batching(d: dict) -> str:
    mine = [p for p in d["points"] if p["where"] == "in-process"]
    last = mine[-1]
    return (f"in-process batch {last['batch']} {_fmt(last['images_per_s'], '.1f')} img/s, "
            f"{_fmt(last['x_first'], '.2f')}x batch {mine[0]['batch']}")


def _cache(d: dict) -> str:
    hit = d["hit, b64_json"]
    return f"hit p50 {_fmt(hit['p50_ms'], '.2f')} ms, {_fmt(hit['ratio_to_miss'], '.3f')}x a miss"


def _flood(d: dict) -> str:
    by = {o["code"]: o for o in d["outcomes"]}
    refused = by.get("overloaded")
    return (f"{by['ok']['count'] if 'ok' in by else 0} served, "
            f"{refused['count'] if refused else 0} refused"
            + (f" (503 p95 {_fmt(refused['p95_ms'], '.1f')} ms)" if refused else ""))


def _state(d: dict) -> str:
    return ", ".join(f"{b} auth p50 {_fmt(r['auth p50 ms'], '.3f')} ms"
                     for b, r in d["backends"].items())


def _policy(d: dict) -> str:
    worst = max(d["rows"], key=lambda r: r["p50_ms"])
    return f"worst p50 {_fmt(worst['p50_ms'], '.3f')} ms ({worst['policy']}, {worst['prompts']})"


def _encode(d: dict) -> str:
    png = [r for r in d["encode"] if r["fmt"] == "png"]
    return f"{len(d['encode'])} encode rows; png {png[-1]['size']}px p50 " \
           f"{_fmt(png[-1]['p50_ms'], '.1f')} ms"


def _safety(d: dict) -> str:
    if "ratios" not in d:
        return f"{d['classifier']}: {len(d['in_process'])} in-process rows"
    return ", ".join(f"{k} {_fmt(v['added_p50_ms_c1'], '+.1f')} ms"
                     for k, v in d["ratios"].items() if k != "none")


def _batch(d: dict) -> str:
    alone = d["interactive alone"]["p95_ms"]
    beside = d["interactive + batch"]["p95_ms"]
    return f"interactive p95 with a batch {_fmt(beside / alone, '.2f')}x alone"


_HEADLINES = {"serve": _serve, "naive": _naive, "coldstart": _coldstart,
              "batching": _batching, "cache": _cache, "flood": _flood, "state": _state,
              "policy": _policy, "encode": _encode, "safety": _safety, "batch": _batch}


def ports_of(name: str, args: argparse.Namespace, metrics_port: int) -> list[int]:
    """The ports the benchmark's servers will listen on (with their direct-ingress
    proxies' at +8), for waiting until the last benchmark's have let go of them."""
    from ..local import DIRECT_INGRESS_PORTS

    flags = PORT_FLAGS.get(name, ())
    if not flags:
        return []
    out = [args.port, args.port + DIRECT_INGRESS_PORTS, args.metrics_port or metrics_port]
    if "--grpc-port" in flags and args.grpc_port:
        out += [args.grpc_port, args.grpc_port + DIRECT_INGRESS_PORTS]
    return out


def wait_free(ports: list[int], deadline_s: float = 90.0) -> list[int]:
    """Wait until every port is free; those still taken at the deadline. The last
    benchmark's Ray workers can outlive its process by seconds, holding them."""
    from .bench_peers import _port_free

    deadline = time.monotonic() + deadline_s
    while (taken := [p for p in ports if not _port_free(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return taken


def run_one(name: str, args: argparse.Namespace, out: Path, metrics_port: int = 8080
            ) -> Outcome:
    json_path, log = out / f"{name}.json", out / f"{name}.log"
    wait_free(ports_of(name, args, metrics_port))  # if still taken, the bench says so
    json_path.unlink(missing_ok=True)  # a stale one must not pass for this run's
    t0 = time.perf_counter()
    env = dict(os.environ)
    if args.metrics_port:  # the stacks a benchmark starts itself read it from settings
        env["IMAGEGEN_METRICS_PORT"] = str(args.metrics_port)
    with open(log, "w") as f:
        # its own process group: a bench past its time is stopped with every process
        # it started (Ray's raylet, GCS and workers would keep the next one's ports)
        proc = subprocess.Popen(command(name, args, json_path), stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
        except KeyboardInterrupt:  # the group does not get the terminal's ^C: pass it on
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            proc.wait()
            raise
    took = time.perf_counter() - t0
    if rc == 0 and not json_path.exists():
        rc, why = 1, "exited 0 but wrote no JSON"
    else:
        why = f"exit {rc}" + (" (timed out)" if rc == 124 else "")
    if rc != 0:
        last = _last_line(log)
        return Outcome(name, rc, took, str(json_path) if json_path.exists() else None,
                       str(log), f"FAILED: {why}" + (f": {last}" if last else ""))
    return Outcome(name, 0, took, str(json_path), str(log),
                   headline(name, json.loads(json_path.read_text())))


def summary_line(o: Outcome) -> str:
    return f"{o.name:<10}{'ok' if o.rc == 0 else 'FAIL':<5}{o.seconds:>7.1f} s  {o.summary}"


def _last_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1].strip()[:200] if lines else ""


def run(args: argparse.Namespace, settings) -> int:
    names = selected(args.only, args.skip)
    if not names:
        print("nothing to run: every benchmark was skipped")
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    mode = "reduced (--quick)" if args.quick else "full"
    print(f"imagegen bench all — {len(names)} benchmark(s), {mode}; output in {out}/",
          flush=True)
    outcomes = []
    live = sys.stdout.isatty()
    for name in names:
        if live:
            print(f"{name} ...", end="\r", flush=True)
        o = run_one(name, args, out, settings.metrics_port)
        outcomes.append(o)
        print(summary_line(o), flush=True)
    failed = [o.name for o in outcomes if o.rc != 0]
    total = sum(o.seconds for o in outcomes)
    (out / "summary.json").write_text(json.dumps(
        {"quick": args.quick, "seconds": total, "failed": failed, "cores":
         len(os.sched_getaffinity(0)), "benches": [asdict(o) for o in outcomes]}, indent=2))
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} ok in {total:.0f} s"
          + (f"; failed: {', '.join(failed)} (logs in {out}/)" if failed else ""))
    return 1 if failed else 0
