"""`imagegen bench serve --peers`: issue 18's stack-tax table, reproducible in one run.

The same tiny pipeline directory, at equal resources (one worker, one torch thread,
batches of up to 8), four ways, in interleaved rounds: the pipeline in this process,
LitServe with a 5 ms batch wait, BentoML with adaptive batching, and imagegen (one
replica, cpu_threads 1, no image classifier: the peers check no images). The peers are
the scripts in loadtests/peers/, run from their own venv (`--setup` makes it; it needs
the network, so before `scripts/loopback`), and they import the project's own engine
and encoder, so every system runs the same pipeline code. One system runs at a time;
each HTTP system is measured by the same async client. Timings are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "loadtests" / "peers"
DEFAULT_VENV = ROOT / ".peers-venv"
LOADED = 16  # the concurrency of the throughput column
BATCH = 8  # max images per pipeline call, every system
PROMPT = "a lighthouse at dusk"
READY_DEADLINE_S = 240.0  # BentoML took ~20 s to get ready on a busy 2-core box
STOP_GRACE_S = 15.0
# (key, table label); the first is the baseline every ratio is taken against.
SYSTEMS = (
    ("in-process", "in-process pipeline"),
    ("litserve", "LitServe {litserve}, 5 ms batch wait"),
    ("bentoml", "BentoML {bentoml}, adaptive batching"),
    ("imagegen", "imagegen (policy: {model} 1 replica, cpu_threads 1)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bench serve`'s peers options (the rest of its flags keep their meaning:
    --requests per point, --port for imagegen, --json)."""
    g = p.add_argument_group("peers (issue 18's table)")
    g.add_argument("--peers", action="store_true",
                   help="instead: in-process vs LitServe vs BentoML vs imagegen at one "
                   f"replica and one torch thread, c=1 p50 and c={LOADED} images/s, in "
                   "interleaved rounds (--concurrency does not apply)")
    g.add_argument("--setup", action="store_true",
                   help="with --peers: create the peers venv (needs the network: run it "
                   "before scripts/loopback) and exit")
    g.add_argument("--rounds", type=int, default=5, help="with --peers: interleaved rounds")
    g.add_argument("--peers-venv", type=Path, default=DEFAULT_VENV,
                   help="with --peers: the venv holding LitServe and BentoML "
                   "(default: .peers-venv at the repo root)")
    g.add_argument("--peer-port", type=int, default=8200,
                   help="with --peers: LitServe listens here, BentoML one above")


def check_args(args: argparse.Namespace) -> str | None:
    """The one-line error for options that do not fit together, else None."""
    if not args.peers:
        if args.setup:
            return "--setup creates the peers venv: use it with --peers"
        return None
    if args.rounds < 1:
        return f"--rounds must be at least 1, got {args.rounds}"
    if args.requests < 1:
        return f"--requests must be at least 1, got {args.requests}"
    if args.threads not in (None, 1):
        return (f"--threads {args.threads}: the peers comparison runs one torch thread in "
                "every system")
    if not 1024 <= args.peer_port <= 65534:
        return f"--peer-port must be from 1024 to 65534, got {args.peer_port}"
    if abs(args.peer_port - args.port) <= 9:  # imagegen takes --port .. --port + 8
        return f"--peer-port {args.peer_port} overlaps imagegen's ports from --port {args.port}"
    return None


# -- the pure part: samples -> the table ------------------------------------------


@dataclass
class Sample:
    """One system in one round."""

    system: str
    round: int
    p50_ms: float  # c=1 (in-process: one image per call)
    images_per_s: float  # c=LOADED (in-process: back-to-back batches of BATCH)
    mean_batch: float


@dataclass
class Spread:
    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, xs: list[float]) -> Spread:
        return cls(statistics.median(xs), min(xs), max(xs))


@dataclass
class Row:
    system: str
    label: str
    p50_ms: Spread
    added_ms: Spread | None  # None for the baseline
    images_per_s: Spread
    ratio: Spread | None  # None for the baseline, or no round measured both
    mean_batch: float
    baseline: bool = False


def summarize(samples: list[Sample], labels: dict[str, str]) -> list[Row]:
    """Medians and ranges over rounds, per system in `labels`' order. Added latency and
    the throughput ratio are taken against the baseline (the first system) of the same
    round, then summarized: a slow round slows both sides of its own difference."""
    base, *_ = labels
    by_round = {s.round: s for s in samples if s.system == base}
    rows = []
    for system, label in labels.items():
        mine = [s for s in samples if s.system == system]
        if not mine:
            continue
        paired = [(s, by_round[s.round]) for s in mine if s.round in by_round]
        added = ratio = None
        if system != base and paired:
            added = Spread.of([s.p50_ms - b.p50_ms for s, b in paired])
            ratio = Spread.of([s.images_per_s / b.images_per_s for s, b in paired])
        rows.append(Row(system, label, Spread.of([s.p50_ms for s in mine]), added,
                        Spread.of([s.images_per_s for s in mine]), ratio,
                        statistics.fmean(s.mean_batch for s in mine), system == base))
    return rows


def _cell(s: Spread | None, fmt: str, unit: str = "") -> str:
    if s is None:
        return "-"
    if len({fmt.format(s.lo), fmt.format(s.hi)}) == 1:
        return fmt.format(s.median) + unit
    return f"{fmt.format(s.median)}{unit} ({fmt.format(s.lo)} to {fmt.format(s.hi)})"


def table(rows: list[Row]) -> str:
    """The issue's Markdown table: each cell the median over rounds (min to max)."""
    head = f"| system | c=1 p50 | added over in-process | c={LOADED} images/s | x in-process batched |"
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ips = _cell(r.images_per_s, "{:.1f}")
        if r.baseline:
            ips += f" (batch {BATCH})"
        lines.append(f"| {r.label} | {_cell(r.p50_ms, '{:.1f}', ' ms')} | "
                     f"{_cell(r.added_ms, '{:+.1f}', ' ms')} | {ips} | "
                     f"{'1' if r.baseline else _cell(r.ratio, '{:.2f}')} |")
    return "\n".join(lines)


def one_replica_policy(doc: dict, model: str) -> dict:
    """The policy document with `model` at exactly one replica and one torch thread,
    the peers' resources (batching stays the project's own)."""
    doc = copy.deepcopy(doc)
    models = doc.setdefault("models", {}) or {}
    doc["models"] = models
    mine = models.get(model) or {}
    mine["cpu_threads"] = 1
    mine["autoscaling"] = {**(mine.get("autoscaling") or {}), "min_replicas": 1,
                           "max_replicas": 1}
    models[model] = mine
    return doc


def pins(path: Path = PEERS_DIR / "requirements.txt") -> dict[str, str]:
    """name -> version of the peers venv's `name==version` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


# -- measuring ------------------------------------------------------------------


async def post_load(url: str, body_of: Callable[[int], object], n: int, c: int,
                    headers: dict[str, str]) -> tuple[list[float], float, list[int]]:
    """n POSTs (fresh seeds, each a cache miss) from c workers on one connection pool:
    latencies, wall time and the pipeline batch each request ran in (every system's
    body names it; 0 for an imagegen cache hit). `bench serve` and the peers share it."""
    import aiohttp

    from .bench import fresh_seeds

    lat: list[float] = []
    batches: list[int] = []
    bar = tqdm(total=n, desc=f"{url}, concurrency {c}", leave=False)
    remaining = iter(fresh_seeds(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        for seed in remaining:
            t = time.perf_counter()
            async with session.post(url, json=body_of(seed)) as r:
                data = await r.json(content_type=None)
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status} from {url}: {str(data)[:200]}")
            lat.append(time.perf_counter() - t)
            batches.append(_batch_of(data))
            bar.update()

    conn = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=conn, headers=headers) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(c)))
        wall = time.perf_counter() - t0
    bar.close()
    return lat, wall, batches


def _batch_of(data) -> int:
    if isinstance(data, list):  # BentoML's batchable API answers a list per request
        data = data[0]
    batch = data.get("batch_images")
    return data["imagegen"]["batch_images"] if batch is None else batch


def measure_http(system: str, round_: int, url: str, body_of: Callable[[int], object],
                 n: int, headers: dict[str, str] | None = None) -> Sample:
    from .bench import _pct

    load = (lambda n, c: asyncio.run(post_load(url, body_of, n, c, headers or {})))
    load(10, 1)  # warm connections, handles and the pipeline
    load(2 * LOADED, LOADED)  # and the batch path
    lat, _, _ = load(n, 1)
    loaded, wall, batches = load(max(n, 4 * LOADED), LOADED)
    return Sample(system, round_, _pct(lat, 0.5), len(loaded) / wall,
                  statistics.fmean(batches))


def in_process_sample(entry, settings, round_: int, n: int) -> Sample:
    from .bench import bench_in_process

    single, batched = bench_in_process(entry, settings, 1, n, BATCH)
    return Sample("in-process", round_, single.p50_ms, batched.images_per_s, BATCH)


def imagegen_sample(settings, tier: str, round_: int, n: int) -> Sample:
    from .. import local
    from .bench import throwaway_key
    from .bench_safety import _start_when_free

    settings, key = throwaway_key(settings)
    base = _start_when_free(settings)
    try:
        return measure_http("imagegen", round_, base + "/v1/images",
                            lambda seed: {"prompt": PROMPT, "tier": tier, "seed": seed}, n,
                            {"Authorization": f"Bearer {key}"})
    finally:
        local.stop()


# -- the peer servers -------------------------------------------------------------


class PeerError(RuntimeError):
    pass


@dataclass(frozen=True)
class Peer:
    key: str
    health: str  # GET path answering 200 once the pipeline is loaded
    route: str
    wrap: Callable[[dict], object]  # one request body -> what this peer's API takes

    def command(self, venv: Path, port: int) -> list[str]:
        if self.key == "litserve":
            return [str(venv / "bin" / "python"), str(PEERS_DIR / "litserve_server.py"),
                    "--host", "127.0.0.1", "--port", str(port)]
        return [str(venv / "bin" / "bentoml"), "serve", "bentoml_service:ImageGen",
                "--working-dir", str(PEERS_DIR), "--host", "127.0.0.1", "--port", str(port)]


PEERS = (Peer("litserve", "/health", "/predict", lambda body: body),
         Peer("bentoml", "/readyz", "/generate", lambda body: {"bodies": [body]}))


def peer_spec(entry, settings) -> dict:
    """What loadtests/peers/peer_pipeline.py loads: the revision, the engine options an
    imagegen replica gets at one thread (serve/app.py), the draft's default shape."""
    d = entry.defaults
    return {"name": entry.name, "revision": entry.revision,
            "path": str(entry.local_dir(settings.model_dir)), "pipeline": entry.pipeline,
            "dtype": entry.dtype,
            "options": entry.engine_options(settings.engine_options, {"threads": 1}),
            "width": d.width, "height": d.height, "steps": d.steps, "guidance": d.guidance}


def peer_env(venv: Path, spec: dict, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        # The peer scripts, and the repo root: they import the project's engine.
        PYTHONPATH=os.pathsep.join((str(PEERS_DIR), str(ROOT))), PEER_SPEC=json.dumps(spec),
        # One thread in every pool a peer could start, as Ray gives the replica.
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", BENTOML_HOME=str(home / "bentoml"), BENTOML_DO_NOT_TRACK="True")
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def peer_server(peer: Peer, venv: Path, spec: dict, port: int, logs: Path) -> Iterator[str]:
    """The peer running on 127.0.0.1:port and ready; stopped (its whole process
    group: LitServe's workers outlive a signalled parent) however the block ends."""
    deadline = time.monotonic() + 30
    while not _port_free(port):  # the last round's server may still be exiting
        if time.monotonic() > deadline:
            raise PeerError(f"port {port} for {peer.key} is in use; choose --peer-port")
        time.sleep(0.5)
    log = logs / f"{peer.key}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(peer.command(venv, port), cwd=PEERS_DIR,
                                env=peer_env(venv, spec, logs), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base + peer.health, log)
        yield base + peer.route
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"{url} exited with {proc.returncode} before ready: {_tail(log)} "
                            f"(log: {log})")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise PeerError(f"{url} not ready after {READY_DEADLINE_S:.0f} s (log: {log})")


def _stop(proc: subprocess.Popen) -> None:
    # start_new_session made the peer the leader of its own group: this signals the
    # processes it started and nothing else.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- the command ------------------------------------------------------------------


def setup(venv: Path) -> int:
    if os.environ.get("LOOPBACK_NS") == "1":
        print("--setup needs the network, which scripts/loopback has not: run it first, "
              "outside")
        return 2
    rc = subprocess.call([str(PEERS_DIR / "setup.sh"), str(venv)])
    if rc == 0:
        print("next: scripts/loopback imagegen bench serve --peers"
              + ("" if venv == DEFAULT_VENV else f" --peers-venv {venv}"))
    return rc


def labels(model: str) -> dict[str, str]:
    versions = pins()
    return {key: label.format(model=model, **versions) for key, label in SYSTEMS}


def run(args: argparse.Namespace, settings) -> int:
    """The interleaved rounds, the table, the JSON."""
    if error := check_args(args):
        print(error)
        return 2
    if args.setup:
        return setup(args.peers_venv)
    venv = args.peers_venv.resolve()
    if not (venv / "bin" / "python").exists():
        print(f"no peers venv at {venv}: create it first, outside scripts/loopback (it "
              "needs the network): imagegen bench serve --peers --setup")
        return 2
    try:
        return _run(args, settings, venv)
    except (PeerError, RuntimeError) as e:
        print(f"bench serve --peers: {e}")
        return 1


def _round(args, settings, stack, entry, tier: str, venv: Path, spec: dict, work: Path):
    """(system, measure(round) -> Sample) in the order every round runs them."""
    yield "in-process", lambda r: in_process_sample(entry, settings, r, args.requests)
    for i, peer in enumerate(PEERS):
        def measure(r: int, peer: Peer = peer, port: int = args.peer_port + i) -> Sample:
            with peer_server(peer, venv, spec, port, work) as url:
                return measure_http(peer.key, r, url,
                                    lambda seed: peer.wrap({"prompt": PROMPT, "seed": seed}),
                                    args.requests)
        yield peer.key, measure
    yield "imagegen", lambda r: imagegen_sample(stack, tier, r, args.requests)


def _run(args: argparse.Namespace, settings, venv: Path) -> int:
    import yaml

    from ..lockfile import load_lock
    from ..routing import load_routing
    from ..tinymodels import build_missing

    build_missing(settings.lock_file, settings.model_dir)
    lock = load_lock(settings.lock_file)
    entry = lock.get(args.model)
    tiers = load_routing(settings.routing_file, lock).tiers_of(entry.name)
    if not tiers:
        print(f"model {entry.name} is not routed by any tier; imagegen cannot serve it")
        return 2
    work = Path(tempfile.mkdtemp(prefix="imagegen-peers-"))
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump(one_replica_policy(
        yaml.safe_load(settings.policy_file.read_text()), entry.name)))
    stack = settings.model_copy(update={
        "port": args.port, "grpc_port": 0, "threads": None, "engine": "diffusers",
        "policy_file": policy, "image_classifier": "none"})
    spec = peer_spec(entry, settings)
    names = labels(entry.name)
    samples: list[Sample] = []
    load: list[float] = []  # the 1-minute load average as each round starts
    failures: list[str] = []
    for r in range(args.rounds):
        load.append(os.getloadavg()[0])
        for system, measure in _round(args, settings, stack, entry, tiers[0], venv, spec,
                                      work):
            try:
                samples.append(measure(r))
            except Exception as e:  # noqa: BLE001 - one system's bad round, not the run's
                # Ray's start times out on an overloaded box, a peer may not come up: the
                # round goes without that system and the summary says so.
                failures.append(f"round {r + 1}, {system}: {type(e).__name__}: {e}")
                print(f"bench serve --peers: {failures[-1]}")
        print(f"round {r + 1}/{args.rounds} (load average {load[-1]:.1f}): " + ", ".join(
            f"{s.system} {s.p50_ms:.1f} ms / {s.images_per_s:.1f} img/s"
            for s in samples if s.round == r))
    rows = summarize(samples, names)
    cores = len(os.sched_getaffinity(0))
    busy = (f"; load average {min(load):.1f} to {max(load):.1f} on {cores} cores: other "
            "work skews these figures" if max(load) > cores else "")
    print(f"\nimagegen bench serve --peers — {cores} cores; {entry.name} "
          f"{spec['width']}x{spec['height']} {spec['steps']} steps; one worker, one torch "
          f"thread, batches of up to {BATCH}; {args.rounds} interleaved round(s), "
          f"{args.requests} requests per point; median (min to max){busy}\n")
    print(table(rows))
    out = Path(args.json) if args.json else ROOT / ".bench" / "peers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": entry.name, "rounds": args.rounds, "requests": args.requests,
        "concurrency": [1, LOADED], "batch": BATCH, "cores": cores,
        "peers": pins(), "load_average": load, "samples": [asdict(s) for s in samples],
        "rows": [asdict(r) for r in rows], "failures": failures}, indent=2))
    if failures:
        print(f"\n{len(failures)} measurement(s) failed and are left out:\n  "
              + "\n  ".join(failures))
    print(f"\nfigures: {out}; peer logs: {work}")
    return 1 if failures else 0
