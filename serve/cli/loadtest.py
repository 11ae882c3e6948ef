"""`imagegen loadtest`: the locust load tests in loadtests/ run headless against a
running service, then a report: the SLO verdict and per-tier figures as JSON, a PNG
of latency percentiles and throughput over time, and a table.

Locust runs as a child process (`python -m locust`): it monkey-patches the whole
interpreter with gevent, which this process must not be. The exit code is locust's:
0 when every SLO held, 1 when one was missed, 2 for bad options.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from ..config import ROOT
from .common import api_key as api_key_of
from .common import settings as settings_of

LOADTESTS = ROOT / "loadtests"  # the checkout the package is installed from (editable)
PROFILES = ("smoke", "steady", "step", "spike", "soak")  # loadtests/shapes.py
TRANSPORTS = {
    "http": ["ImagesHttpUser"], "openai": ["ImagesOpenAIUser"], "grpc": ["ImagesGrpcUser"],
    "mix": ["ImagesHttpUser", "ImagesOpenAIUser", "ImagesGrpcUser"],
}
# loadtest flag -> the locustfile's option (None: a flag without a value)
_PASSED = {"users": "--imagegen-users", "duration": "--imagegen-duration",
           "mix": "--imagegen-mix", "template_share": "--imagegen-template-share",
           "max_n": "--imagegen-max-n", "think": "--imagegen-think", "rate": "--imagegen-rate",
           "timeout": "--imagegen-timeout", "slo_p95_draft_ms": "--imagegen-slo-p95-draft-ms",
           "slo_p95_final_ms": "--imagegen-slo-p95-final-ms",
           "max_fail_ratio": "--imagegen-max-fail-ratio"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("loadtest", help="locust load test against a running service: SLO "
                       "verdict as the exit code, JSON and PNG report (README § Load testing)")
    p.add_argument("--profile", choices=PROFILES, default="smoke",
                   help="load shape: smoke (2 users, 10 s), steady (4, 60 s), step (up to 8 "
                   "in 4 steps, 100 s), spike (2 -> 8 -> 2, 60 s), soak (8, 240 s)")
    p.add_argument("--host", dest="url", metavar="URL",
                   help="the service's base URL (default: http://127.0.0.1:PORT of the settings)")
    p.add_argument("--api-key", "--key", dest="api_key", help="default: $IMAGEGEN_API_KEY, "
                   "else the local development key `imagegen serve` made")
    p.add_argument("--out", type=Path, default=Path("loadtest-report"),
                   help="report folder (default: ./loadtest-report)")
    p.add_argument("--transport", choices=TRANSPORTS, default="http",
                   help="HTTP /v1/images, the OpenAI route, gRPC, or all three (equal weight)")
    p.add_argument("--grpc-target", metavar="HOST:PORT",
                   help="gRPC service (default: the URL's host, the settings' gRPC port)")
    p.add_argument("--users", type=int, help="users (peak for step, base for spike); default: "
                   "the profile's")
    p.add_argument("--duration", type=float, help="seconds (default: the profile's)")
    p.add_argument("--mix", default="draft=4,final=1", help="tier weights (default: %(default)s)")
    p.add_argument("--template-share", type=float, default=0.5,
                   help="share of requests naming a template instead of a prompt")
    p.add_argument("--max-n", type=int, default=1, help="images per request, 1..this")
    p.add_argument("--cache", action="store_true", help="repeat 8 fixed recipes (cache hits) "
                   "instead of a fresh seed per request (every request a model call)")
    p.add_argument("--think", type=float, default=0.1,
                   help="mean seconds a user waits between requests (default: %(default)s)")
    p.add_argument("--rate", type=float, help="requests/s in all at Poisson times, open "
                   "loop (each user paced by its own arrivals, not its answers: give enough "
                   "users); default: closed loop with --think")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take")
    p.add_argument("--slo-p95-draft-ms", type=float, help="fail the run when the draft "
                   "tier's p95 is above this")
    p.add_argument("--slo-p95-final-ms", type=float, help="as --slo-p95-draft-ms, final tier")
    p.add_argument("--max-fail-ratio", type=float, default=0.01,
                   help="fail the run above this share of failed requests; 429 and 503 "
                   "are expected refusals, not failures (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no periodic locust stats")
    p.add_argument("--watch", nargs="?", const="auto", metavar="PID",
                   help="soak check of a stack on this machine: sample its processes (the "
                   "tree under PID; default: the one that started this user's raylet) and "
                   "fail the run when, past --warmup, any RSS grows over 5%%, files or "
                   "sockets are left open or Ray objects pile up (soak.json, soak.png)")
    p.add_argument("--warmup", type=float, default=60.0,
                   help="seconds before the soak baseline is taken (default: %(default)s)")
    p.add_argument("--metrics-url", help="Ray's metrics endpoint for the object count "
                   "(default: http://127.0.0.1:METRICS_PORT/metrics of the settings)")
    return p


def run(args: argparse.Namespace) -> int:
    locustfile = LOADTESTS / "locustfile.py"
    if not locustfile.is_file():
        return _error(f"no load tests at {LOADTESTS}: `imagegen loadtest` needs the "
                      "repository checkout the package is installed from (pip install -e)")
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        return _error("locust is not installed: pip install -e '.[loadtest]'")
    settings = settings_of(args)
    url = (args.url or f"http://127.0.0.1:{settings.port}").rstrip("/")
    key = api_key_of(args, settings)
    if not key:
        return _error("no API key: pass --api-key, set IMAGEGEN_API_KEY, or run "
                      "`imagegen serve` once to make the development key")
    if problem := _unreachable(url):
        return _error(problem)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "stats.json", "loadtest.png", "soak.json", "soak.png"):
        (out / stale).unlink(missing_ok=True)  # a failed run must not show an old report
    grpc = args.grpc_target or f"{_hostname(url)}:{settings.grpc_port}"
    if "ImagesGrpcUser" in TRANSPORTS[args.transport] and not (args.grpc_target
                                                               or settings.grpc_port):
        return _error("gRPC is off in the settings (grpc_port 0): pass --grpc-target")
    watch = None
    if args.watch:
        from . import soak

        root = soak.stack_root() if args.watch == "auto" else int(args.watch)
        if root is None:
            return _error("--watch: no single local Ray stack found: give its PID")
        watch = soak.Watch(root, args.metrics_url
                           or f"http://127.0.0.1:{settings.metrics_port}/metrics")
        watch.start()
    try:
        code = _locust(_command(args, locustfile, url, grpc, out), key)
    finally:
        if watch is not None:
            watch.stop()
    report = out / "report.json"
    if not report.exists():
        return _error(f"locust exited {code} without a report (its log above says why)",
                      code or 2)
    doc = json.loads(report.read_text())
    if watch is not None:
        code = max(code, _soak(watch, args.warmup, out))
    png = _plot(out / "locust_stats_history.csv", out / "loadtest.png", args.profile)
    _print_summary(doc, url, out, png)
    return code


def _command(args, locustfile: Path, url: str, grpc: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", url,
           "--csv", str(out / "locust"), "--csv-full-history", "--json-file",
           str(out / "stats"), "--stop-timeout", "5", "--imagegen-profile", args.profile,
           "--imagegen-grpc-target", grpc, "--imagegen-report", str(out / "report.json")]
    for name, flag in _PASSED.items():
        if (value := getattr(args, name)) is not None:
            cmd += [flag, str(value)]
    if args.cache:
        cmd.append("--imagegen-cache")
    if args.quiet:
        cmd += ["--only-summary", "--loglevel", "WARNING"]
    return cmd + TRANSPORTS[args.transport]


def _locust(cmd: list[str], key: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_SKIP_")}
    env["IMAGEGEN_API_KEY"] = key  # not argv: other users can read a command line
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # locust got the Ctrl-C too: it stops and writes its stats
        return proc.wait()


def _unreachable(url: str) -> str | None:
    import httpx

    try:
        httpx.get(f"{url}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        return f"no imagegen service at {url} (GET /healthz: {e})"
    return None


def _hostname(url: str) -> str:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _history(path: Path) -> list[dict]:
    """Locust's --csv-full-history rows: one per entry per second (the percentiles
    over its last 10 s)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):  # "N/A" before an entry's first request
        return None


def _plot(history: Path, png: Path, profile: str) -> Path | None:
    rows = _history(history)
    if not rows:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install -e '.[capacity]')")
        return None
    t0 = min(int(r["Timestamp"]) for r in rows)
    fig = Figure(figsize=(9, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    lat, thr = fig.subplots(2, 1, sharex=True)
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(f"{r['Type']} {r['Name']}".strip(), []).append(r)
    tiers = [(label, rs) for label, rs in sorted(series.items())
             if label != "Aggregated" and " " not in rs[0]["Name"]]  # refusals go below
    for i, (label, rs) in enumerate(tiers):
        for col, style in (("50%", ":"), ("95%", "-")):
            pts = [(int(r["Timestamp"]) - t0, v) for r in rs if (v := _number(r[col]))]
            if pts:
                lat.plot(*zip(*pts, strict=True), style, color=f"C{i % 10}",
                         label=f"{label} p{col[:-1]}")
    agg = series.get("Aggregated", [])
    ts = [int(r["Timestamp"]) - t0 for r in agg]
    thr.plot(ts, [_number(r["Requests/s"]) or 0 for r in agg], label="requests/s")
    thr.plot(ts, [_number(r["Failures/s"]) or 0 for r in agg], label="failures/s")
    refused = {}
    for rs in (rs for rs in series.values() if " " in rs[0]["Name"]):
        for r in rs:
            t = int(r["Timestamp"]) - t0
            refused[t] = refused.get(t, 0) + (_number(r["Requests/s"]) or 0)
    if refused:
        thr.plot(*zip(*sorted(refused.items()), strict=True), label="429/503 per s")
    users = thr.twinx()
    users.step(ts, [int(r["User Count"]) for r in agg], "k--", where="post", alpha=0.4)
    users.set_ylabel("users (dashed)")
    lat.set_ylabel("latency (ms, last 10 s)")
    lat.set_title(f"imagegen loadtest --profile {profile}")
    thr.set_ylabel("per second")
    thr.set_xlabel("seconds since start")
    for ax in (lat, thr):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(png, format="png")
    return png


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _soak(watch, warmup_s: float, out: Path) -> int:
    """The soak verdict: printed, soak.json and soak.png; 1 when something grew."""
    from . import soak

    v = soak.verdict(watch.samples, watch.names, warmup_s)
    (out / "soak.json").write_text(json.dumps(v, indent=2))
    soak.plot(watch.samples, watch.names, warmup_s, out / "soak.png")
    print(f"\nsoak: {len(v['processes'])} processes compared from {warmup_s:g} s to the end"
          + (f"; Ray objects {v['objects'][0]:g} -> {v['objects'][1]:g}"
             if v.get("objects") and None not in v["objects"] else ""))
    worst = sorted(v["processes"], key=lambda r: -r["rss_growth"])[:5]
    for r in worst:
        print(f"  {r['rss_growth']:>+7.1%}  {r['rss_mb'][0]:>7.1f} -> {r['rss_mb'][1]:>7.1f} MB"
              f"  files {r['files'][0]}->{r['files'][1]}  sockets {r['sockets'][0]}->"
              f"{r['sockets'][1]}  {r['name']}")
    for problem in v["problems"]:
        print(f"  LEAK {problem}")
    print(f"soak {'clean' if v['ok'] else 'FAILED'}: {out}/soak.json, soak.png")
    return 0 if v["ok"] else 1


def _print_summary(doc: dict, url: str, out: Path, png: Path | None) -> None:
    refused = sum(n for t in doc["tiers"].values() for n in t["refused"].values())
    ratio = doc["failures"] / doc["requests"] if doc["requests"] else 0.0
    print(f"\nimagegen loadtest --profile {doc['profile']} against {url}: {doc['requests']} "
          f"requests, {doc['failures']} failed ({ratio:.2%}), {refused} refused (429/503)\n")
    print(f"{'type':<8}{'name':<14}{'requests':>9}{'failed':>8}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'p99 ms':>8}{'req/s':>8}")
    for e in doc["entries"]:
        print(f"{e['type']:<8}{e['name']:<14}{e['requests']:>9}{e['failures']:>8}"
              f"{_ms(e['p50_ms']):>8}{_ms(e['p95_ms']):>8}{_ms(e['p99_ms']):>8}{e['rps']:>8.1f}")
    print()
    for c in doc["checks"]:
        got = "none" if c["measured"] is None else f"{c['measured']:.4g}"
        print(f"  {'ok    ' if c['ok'] else 'MISSED'} {c['what']}: {got} (want {c['op']} "
              f"{c['limit']:g})")
    print(f"\nSLO {'met' if doc['ok'] else 'MISSED'}; report in {out}/: report.json, "
          f"stats.json{', ' + png.name if png else ''}, locust_*.csv")
