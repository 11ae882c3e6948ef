"""`imagegen capacity ...`: check, plan, simulate and profile. Glue between the
settings, models.lock, routing, the policy and the pure modules in autoscaling/."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..config import ROOT
from ..lockfile import Profile, load_lock, verify
from ..routing import load_routing
from .common import settings as settings_of

DEFAULT_SLO_S = {"draft": 10.0, "final": 60.0, "batch": 3600.0}


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("capacity", help="SRE capacity: check, plan, simulate, profile")
    c.add_argument("--policy", type=Path, help="autoscaling policy (default: settings)")
    csub = c.add_subparsers(dest="capacity_command", required=True)
    csub.add_parser("check", help="fail when max GPU demand exceeds the node cap unenforced")
    for name, text in (("plan", "replicas, nodes, p50/p95 and cost for arrival rates"),
                       ("simulate", "discrete-event simulation of the planned pools")):
        p = csub.add_parser(name, help=text)
        p.add_argument("--rate", action="append", default=[], metavar="TIER=RPS",
                       help="requests per second of a tier (repeat per tier)")
        p.add_argument("--slo", action="append", default=[], metavar="TIER=SECONDS",
                       help=f"p95 SLO of a tier (defaults {DEFAULT_SLO_S})")
        p.add_argument("--route", action="append", default=[], metavar="TIER=MODEL",
                       help="what if a tier ran this model (from the lock or --profiles)")
        p.add_argument("--profiles", type=Path, action="append", default=[],
                       help="extra lock-shaped TOML with [models.NAME.profiles.TYPE] tables")
        p.add_argument("--cv", type=float, default=0.1, help="batch time CV (default 0.1)")
        p.add_argument("--overhead-ms", type=float, default=0.0,
                       help="latency per request outside the pipeline (HTTP, ingress, "
                            "encode): `imagegen bench serve`'s added p50 at c=1")
        p.add_argument("--trace", type=Path, help="CSV/JSONL rows time_s,tier,width,height,n"
                       "[,steps]: the rates and size mix per tier (and, to simulate, "
                       "the arrivals themselves)")
        if name == "plan":
            p.add_argument("--plots", type=Path, help="write latency/cost PNGs into DIR")
        else:
            p.add_argument("--duration", type=float, default=3600.0,
                           help="seconds of Poisson arrivals when no trace (default 3600)")
            p.add_argument("--autoscale", action="store_true",
                           help="start from min replicas and let the budget autoscaler act")
            p.add_argument("--cold-start", type=float, default=60.0, help="seconds")
            p.add_argument("--seed", type=int, default=1)
    sc = csub.add_parser("serve-config", help="the Serve config (RayService serveConfigV2)"
                         " application entry, with the budget policy when enabled")
    sc.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                    help="build_app argument, e.g. model_dir=/models")
    pr = csub.add_parser("profile", help="measure seconds/megapixel and peak memory here")
    pr.add_argument("rev", nargs="?", help="models.lock name to profile")
    pr.add_argument("--recipe", choices=["sd15-arch", "sdxl-arch"],
                    help="an architecture-faithful random-weight pipeline instead")
    pr.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    pr.add_argument("--steps", type=int, help="denoising steps (default: the model's; 20)")
    pr.add_argument("--batches", default="1,2,4,8", help="batch sizes (default 1,2,4,8)")
    pr.add_argument("--repeats", type=int, default=3)
    pr.add_argument("--attention", choices=["auto", "sdpa", "xformers"], default="auto")
    pr.add_argument("--compile", action="store_true", help="UNet under torch.compile")
    pr.add_argument("--key", help="profile key (default: this accelerator's type)")
    pr.add_argument("--in-place", metavar="METRICS_URL",
                    help="read it off a running stack's metrics endpoint over --window of "
                    "its real traffic instead (every model that served, or REV)")
    pr.add_argument("--window", type=float, default=30.0,
                    help="seconds of traffic to read in place (default 30)")
    pr.add_argument("--replicas", action="append", default=[], metavar="MODEL=N",
                    help="in place: replicas of MODEL (default: the policy's min_replicas)")
    pr.add_argument("--write", action="store_true", help="record it in models.lock")
    pr.add_argument("--out", type=Path, help="record it in this lock-shaped TOML instead")
    return c


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    commands = {"check": _check, "plan": _plan, "simulate": _simulate, "profile": _profile,
                "serve-config": _serve_config}
    try:
        return commands[args.capacity_command](args, settings)
    except (ValueError, OSError) as e:  # bad policy, trace or profile file: say which
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"error: {e.name} is missing: pip install 'imagegen[capacity]'", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: missing key {e} (a --profiles file needs "
              "[models.NAME.profiles.TYPE] tables)", file=sys.stderr)
        return 2


def _policy(args, settings):
    from autoscaling.policies import load_policy

    return load_policy(args.policy or settings.policy_file)


def _check(args, settings) -> int:
    from autoscaling.capacity import check

    policy = _policy(args, settings)
    lock = load_lock(settings.lock_file)
    routing = load_routing(settings.routing_file, lock)
    res = check(policy, {n: e.vram_gb for n, e in lock.models.items()},
                {t: r.model for t, r in routing.tiers.items()})
    if not res.demands:
        print("no revision asks for GPUs (CPU policy): nothing to cap")
    for d in res.demands:
        print(f"{d.gpu_type}: cap {d.cap_gpus} GPUs; demand min {d.min_gpus:g}, "
              f"max {d.max_gpus:g}  ({', '.join(f'{m} {g:g}' for m, g in d.by_model.items())})")
    for note in res.notes:
        print(f"note: {note}")
    for err in res.errors:
        print(f"FAIL: {err}", file=sys.stderr)
    print("ok" if res.ok else "capacity check failed")
    return 0 if res.ok else 1


def _serve_config(args, settings) -> int:
    import yaml

    from autoscaling.serve_policy import serve_config

    lock = load_lock(settings.lock_file)
    routing = load_routing(settings.routing_file, lock)
    build_args = _pairs(args.arg, "arg", str)
    if args.policy and "policy_file" not in build_args:
        # The replicas must build their deployments from this same policy; a path
        # inside the checkout stays relative (a RayService's working_dir).
        path = args.policy.resolve()
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        build_args["policy_file"] = str(rel)
    app = serve_config(_policy(args, settings), lock, routing, args=build_args)
    print(yaml.safe_dump({"http_options": http_options(settings),
                          "grpc_options": grpc_options(settings), "applications": [app]},
                         sort_keys=False), end="")
    return 0


def http_options(settings) -> dict:
    """Serve's HTTP proxies: the end-to-end deadline `imagegen serve` sets too (the
    ingress's drain grace and the idempotency lease assume it)."""
    return {"request_timeout_s": settings.request_timeout_s}


def grpc_options(settings) -> dict:
    """Serve's gRPC proxy on every node: imagegen.v1.Images, health and reflection."""
    from ..ingress.grpc import SERVICER_FUNCTIONS

    return {"port": settings.grpc_port or 9000, "grpc_servicer_functions": SERVICER_FUNCTIONS,
            **http_options(settings)}


def _pairs(values: list[str], what: str, cast=float) -> dict:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep:
            raise SystemExit(f"--{what} {v!r}: expected TIER=VALUE")
        out[key] = cast(val)
    return out


def _inputs(args, settings):
    import tomllib

    from autoscaling.capacity import ModelFacts, plan_inputs

    policy = _policy(args, settings)
    lock = load_lock(settings.lock_file)
    routing = load_routing(settings.routing_file, lock)
    models = ModelFacts.of_lock(lock.models)
    for path in args.profiles:
        for name, table in tomllib.loads(path.read_text())["models"].items():
            profiles = {k: Profile.model_validate(v) for k, v in table["profiles"].items()}
            known = models.get(name)
            if known:
                models[name] = ModelFacts(known.width, known.height, known.steps,
                                          {**known.profiles, **profiles})
            else:
                first = next(iter(profiles.values()))
                models[name] = ModelFacts(first.width, first.height, first.steps, profiles)
    routes = {t: r.model for t, r in routing.tiers.items()} | _pairs(args.route, "route", str)
    rates, mixes = {}, None
    if args.trace:
        from autoscaling.capacity import trace_load
        from autoscaling.simulator import load_trace

        steps = {t: models[m].steps for t, m in routes.items() if m in models}
        rates, mixes = trace_load(load_trace(args.trace), steps)
    rates |= _pairs(args.rate, "rate")
    if not rates:
        raise SystemExit("give --rate TIER=RPS (per tier) or --trace FILE")
    slos = {t: DEFAULT_SLO_S.get(t, 60.0) for t in rates} | _pairs(args.slo, "slo")
    return plan_inputs(policy, models, routes, rates, slos, service_cv=args.cv,
                       overhead_s=args.overhead_ms / 1e3, mixes=mixes)


def _plan(args, settings) -> int:
    from autoscaling import planner

    inputs = _inputs(args, settings)
    p = planner.plan(inputs)
    _print_plan(p)
    if args.plots:
        for path in _plots(inputs, p, args.plots):
            print(f"wrote {path}")
    return 0 if p.fits_cap and not p.slo_misses else 1


def _print_plan(p) -> None:
    print(f"{'tier':<8}{'model':<14}{'req/s':>7}{'SLO p95':>9}{'p50 s':>8}{'p95 s':>8}  meets")
    for t in p.tiers.values():
        print(f"{t.tier:<8}{t.revision:<14}{t.rate_rps:>7.2f}{t.slo_p95_s:>9.2f}"
              f"{t.p50_s:>8.3f}{t.p95_s:>8.3f}  {'yes' if t.meets_slo else 'NO'}")
    print(f"\n{'model':<14}{'accel':<14}{'replicas':>9}{'needed':>7}{'accel':>6}"
          f"{'batch':>7}{'util':>6}{'busy':>6}{'slower':>7}")
    for r in p.revisions.values():
        print(f"{r.revision:<14}{r.gpu:<14}{r.replicas:>9}{r.required_replicas:>7}"
              f"{r.gpus:>6g}{r.perf.mean_batch_images:>7.2f}{r.perf.utilisation:>6.2f}"
              f"{r.perf.busy:>6.2f}{r.slowdown:>6.2f}x")
    print()
    for pool in p.pools.values():
        # accel on a shared-cores node: the CPUs Ray reserves; utilisation: busy cores
        print(f"{pool.gpu}: {pool.nodes}/{pool.max_nodes} nodes, {pool.gpus_used:g}/"
              f"{pool.gpus_provisioned} GPUs used, GPU utilisation {pool.gpu_utilisation:.0%}, "
              f"${pool.cost_per_hour:,.2f}/h, spare {pool.spare_nodes} nodes "
              f"({pool.spare_gpus:g} GPUs) under the cap")
    print(f"total ${p.cost_per_hour:,.2f}/h, ${p.cost_per_image:.3g}/image; "
          f"{'fits the cap' if p.fits_cap else 'DOES NOT FIT the cap'}"
          + (f"; SLO missed by {', '.join(p.slo_misses)}" if p.slo_misses else ""))


def _plots(inputs, p, out: Path) -> list[Path]:
    from autoscaling import planner
    from autoscaling.plots import plot_cost_vs_slo, plot_latency_vs_load

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rev in p.revisions.items():
        base = sum(t.rate_rps for t in inputs.tiers.values() if t.revision == name)
        if not rev.replicas or not base:
            continue
        # Up to where the planned pool saturates (utilisation 1 at full batches).
        top = base / rev.perf.utilisation if rev.perf.utilisation > 0 else 2 * base
        points = planner.sweep_load(inputs, name, [top * f / 40 for f in range(1, 40)])
        paths.append(plot_latency_vs_load(
            points, rev.slo_p95_s, out / f"latency-{name}.png", planned_rps=base,
            title=f"{name}: latency against load, {rev.replicas} replicas on {rev.gpu}"))
    # From just above the fastest planned median (no pool can beat its service
    # time) to the loosest SLO, log-spaced: where cost changes with the SLO.
    fast = min((r.perf.p50_s for r in p.revisions.values() if r.perf.p50_s < float("inf")),
               default=0.1)
    hi = max(t.slo_p95_s for t in inputs.tiers.values())
    lo = min(fast * 1.1, hi / 2)
    grid = [lo * (hi / lo) ** (i / 15) for i in range(16)]
    paths.append(plot_cost_vs_slo(planner.sweep_slo(inputs, grid), out / "cost-vs-slo.png"))
    return paths


def _simulate(args, settings) -> int:
    from autoscaling import planner, simulator

    inputs = _inputs(args, settings)
    p = planner.plan(inputs)
    # The simulator runs each batch at its profile's speed: on shared cores, at the
    # speed the plan's contention gives it (the plan's `slower` column).
    revisions = {}
    for name, spec in inputs.revisions.items():
        r = p.revisions.get(name)
        if r is not None and r.slowdown != 1.0:
            prof = spec.profiles[r.gpu]
            spec = spec.model_copy(update={"profiles": {**spec.profiles, r.gpu: prof.model_copy(
                update={"seconds_per_megapixel": {b: t * r.slowdown for b, t in
                                                  prof.seconds_per_megapixel.items()}})}})
        revisions[name] = spec
    inputs = inputs.model_copy(update={"revisions": revisions})
    arrivals = simulator.load_trace(args.trace) if args.trace else None
    duration = max(a.time_s for a in arrivals) + 1 if arrivals else args.duration
    scaler = None
    if args.autoscale:
        policy = _policy(args, settings)
        scaling = [policy.for_model(m).autoscaling for m in inputs.revisions]
        scaler = simulator.AutoscalerConfig(
            cold_start_s=args.cold_start,
            upscale_delay_s=max(a.upscale_delay_s for a in scaling),
            downscale_delay_s=max(a.downscale_delay_s for a in scaling),
        )
    config = simulator.SimConfig(duration_s=duration, warmup_s=min(300.0, duration / 10),
                                 seed=args.seed, autoscaler=scaler)
    res = simulator.simulate(inputs, p, config, arrivals)
    print(f"{'tier':<8}{'done':>8}{'dropped':>8}{'p50 s':>8}{'p95 s':>8}{'planner p95':>12}"
          f"{'sim/plan':>9}")
    for name, t in res.tiers.items():
        planned = p.tiers[name].p95_s if name in p.tiers else float("nan")
        ratio = t.p95_s / planned if planned > 0 else float("nan")
        print(f"{name:<8}{t.completed:>8}{t.dropped + t.timed_out:>8}{t.p50_s:>8.3f}"
              f"{t.p95_s:>8.3f}{planned:>12.3f}{ratio:>9.2f}")
    print(f"peak GPUs {dict(res.peak_gpus)}, GPU-seconds {res.gpu_seconds:,.0f}, "
          f"cost ${res.cost:,.2f} over {duration / 3600:.2f} h")
    return 0


def _profile(args, settings) -> int:
    if args.in_place:
        return _profile_in_place(args, settings)
    if bool(args.rev) == bool(args.recipe):
        raise SystemExit("give a models.lock name or --recipe, not both")
    if args.write and not args.rev:
        raise SystemExit("--write records into models.lock: only for a lock revision")
    from tqdm import tqdm

    from autoscaling.profiler import measure

    from ..engines.base import EngineSpec, Job
    from ..engines.diffusers_engine import DiffusersEngine, accelerator

    key, device, software = accelerator()
    # A lock revision profiles with its `engine` table, as its replicas run; the
    # flags win over it (--compile keeps a mode the table names).
    options: dict = {}
    if args.attention != "auto":
        options["attention"] = args.attention
    if settings.threads:
        options["threads"] = settings.threads
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe:
            from ..archmodels import ARCHS, build_arch

            cuda = key != "cpu"
            dtype = "float16" if cuda else "float32"
            print(f"building {args.recipe} (random weights) ...", flush=True)
            pipeline = build_arch(args.recipe, Path(tmp), dtype, "cuda" if cuda else "cpu")
            spec = EngineSpec(args.recipe, "random", Path(tmp), pipeline, dtype,
                              with_compile({**settings.engine_options, **options}, args.compile))
            size, steps, guidance = ARCHS[args.recipe][1], 20, 7.0
            width = height = size
        else:
            entry = load_lock(settings.lock_file).get(args.rev)
            root = entry.local_dir(settings.model_dir)
            verify(entry, root)
            spec = EngineSpec(entry.name, entry.revision, root, entry.pipeline, entry.dtype,
                              with_compile(entry.engine_options(settings.engine_options,
                                                                options), args.compile))
            d = entry.defaults
            width, height, steps, guidance = d.width, d.height, d.steps, d.guidance
        if args.size:
            width, height = (int(x) for x in args.size.split("x"))
        steps = args.steps or steps
        engine = DiffusersEngine(spec)
        engine.load()
        job = Job("a lighthouse on a cliff at dusk, oil painting", "", width, height, steps,
                  guidance, 0)
        name = args.recipe or args.rev
        with tqdm(total=len(batches) * args.repeats, desc=f"{name} on {key}") as bar:
            prof = measure(engine, job, batches, repeats=args.repeats, device=device,
                           software=software, tick=bar.update)
    key = args.key or key
    print(f"\n{name} on {device} ({key}), {width}x{height}, {steps} steps, "
          f"{prof.attention}{', compiled' if prof.compiled else ''}")
    print(f"{'batch':>6}{'s/batch':>9}{'img/s':>8}{'s/MP':>8}{'peak GB':>9}")
    mp = width * height / 1e6
    for b, spmp in prof.seconds_per_megapixel.items():
        print(f"{b:>6}{spmp * b * mp:>9.3f}{1 / (spmp * mp):>8.2f}{spmp:>8.3f}"
              f"{prof.peak_memory_gb[b]:>9.2f}")
    target = settings.lock_file if args.write else args.out
    if target:
        record_profile(Path(target), name, key, prof)
        print(f"recorded [models.{name}.profiles.{key}] in {target}")
    return 0


def with_compile(options: dict, compile_: bool) -> dict:
    """`--compile`: the UNet under torch.compile, in the mode the options name if they
    name one, else the default mode."""
    if compile_ and options.get("compile") in (None, False, "off"):
        return {**options, "compile": "default"}
    return options


def _profile_in_place(args, settings) -> int:
    """Profiles of the models a running stack served during --window, its busy
    fractions and the stack's own core time per request (the policy's
    cpu_per_request_s)."""
    import time
    import urllib.parse
    import urllib.request

    from tqdm import tqdm

    from autoscaling.policies import load_policy
    from autoscaling.profiler import in_place, parse_metrics

    url = args.in_place if "://" in args.in_place else f"http://{args.in_place}/metrics"
    lock, policy = load_lock(settings.lock_file), load_policy(settings.policy_file)
    key = args.key or "cpu"
    node = policy.cluster.node_types.get(key)
    if node is None:
        raise ValueError(f"the policy has no node type {key!r}: give --key")
    counts = _pairs(args.replicas, "replicas", int)
    if bad := [f"{m}={n}" for m, n in counts.items() if n < 1]:
        raise ValueError(f"--replicas {' '.join(bad)}: a model that served has 1 or more")
    if args.rev and args.rev not in lock.models:
        raise ValueError(f"{args.rev!r} is not in {settings.lock_file}")

    def scrape() -> tuple[dict, float | None]:
        with urllib.request.urlopen(url, timeout=10) as r:
            series = parse_metrics(r.read().decode())
        where = urllib.parse.urlparse(url)
        return series, _busy_cores(series, where.hostname, where.port or 80)

    before, cpu0 = scrape()
    t0, samples = time.monotonic(), []
    with tqdm(total=round(args.window), desc=f"reading {url}", unit="s") as bar:
        while (left := args.window - (time.monotonic() - t0)) > 0:
            time.sleep(min(1.0, left))
            bar.update(round(time.monotonic() - t0) - bar.n)
            if cpu0 is not None and cpu0[0] == "ray" and (now := _busy_cores(scrape()[0], "")):
                samples.append(now[1])
    after, cpu1 = scrape()
    window = time.monotonic() - t0
    busy_cores = None
    # Host cores mean something only where the replicas share them (a CPU node): a
    # GPU's busy time is its own.
    if node.shared_cores and cpu0 is not None and cpu1 is not None:
        busy_cores = (sum(samples) / len(samples) if cpu0[0] == "ray" and samples
                      else (cpu1[1] - cpu0[1]) / window)
    served = sorted({dict(labels)["model"] for (n, labels) in after
                     if n == "imagegen_pipeline_busy_seconds_total"})
    names = [args.rev] if args.rev else [m for m in served if m in lock.models]
    models = {}
    for m in names:
        p = policy.for_model(m)
        threads = min(p.cpu_threads or node.gpus_per_node, node.gpus_per_node)
        models[m] = (int(counts.get(m, max(1, p.autoscaling.min_replicas))),
                     p.num_gpus or threads)
    got = in_place(before, after, window, models=models, cores=node.gpus_per_node,
                   steps={m: lock.models[m].defaults.steps for m in models},
                   cpu_cores_busy=busy_cores, device=f"{key} in place",
                   size={m: (lock.models[m].defaults.width, lock.models[m].defaults.height)
                         for m in models})
    print(f"\nin place over {window:.0f} s: {got.requests_per_s:.2f} requests/s, node cores "
          f"busy {'unknown' if busy_cores is None else f'{busy_cores:.2f}'} of "
          f"{node.gpus_per_node}")
    print(f"{'model':<14}{'replicas':>9}{'busy':>6}{'slower':>8}  s/MP by batch (measured -> "
          f"quiet)")
    for m, (replicas, _) in models.items():
        table = "  ".join(f"{b}: {got.measured_spmp[m][b]:.3g}->{t:.3g}" for b, t in
                          (got.profiles[m].seconds_per_megapixel.items()
                           if m in got.profiles else []))
        print(f"{m:<14}{replicas:>9}{got.busy[m]:>6.2f}{got.slowdown[m]:>7.2f}x  "
              f"{table or 'no batches in the window'}")
    if got.cpu_per_request_s is not None:
        print(f"the stack's own core time: {got.cpu_per_request_s * 1e3:.1f} ms per request: "
              f"set cluster.node_types.{key}.cpu_per_request_s: "
              f"{got.cpu_per_request_s:.4f} in {settings.policy_file}")
    target = settings.lock_file if args.write else args.out
    missing = []
    for m, prof in got.profiles.items():
        old = lock.models[m].profiles.get(key)
        if not target:
            continue
        if old is None:
            # In place measures time, not memory: a profile needs a quiet run's first.
            missing.append(m)
            continue
        record_profile(Path(target), m, key, over_quiet(old, prof))
        print(f"recorded [models.{m}.profiles.{key}] in {target} (batch sizes the "
              f"window saw: {', '.join(map(str, prof.seconds_per_megapixel))}; the rest "
              "kept from the quiet profile)")
    if missing:
        print(f"not recorded: {', '.join(missing)} has no quiet [profiles.{key}] to take "
              f"memory and the unseen batch sizes from: run `imagegen capacity profile "
              f"{missing[0]} --key {key} --write` first")
        return 1
    return 0 if got.profiles else 1


def over_quiet(quiet: Profile, seen: Profile) -> Profile:
    """A quiet profile with the batch sizes an in-place window saw replaced by what
    it measured (their contention already taken out, brought to the quiet run's
    steps, as the planner scales by steps); the others, the memory and the rest of
    the quiet run stay."""
    from autoscaling.profiler import monotone

    scale = quiet.steps / seen.steps
    # no batch may take less time than a smaller one (the lock refuses that table)
    spmp = monotone(dict(quiet.seconds_per_megapixel) | {
        b: t * scale for b, t in seen.seconds_per_megapixel.items()})
    return quiet.model_copy(update={
        "seconds_per_megapixel": dict(sorted(spmp.items())),
        "peak_memory_gb": {b: quiet.peak_memory_gb.get(b, max(quiet.peak_memory_gb.values()))
                           for b in spmp},
        "device": seen.device, "measured": seen.measured})


def _ray_listens(port: int | None) -> bool:
    """Whether a Ray process of this machine serves `port` (the stack is local), not,
    say, a `kubectl port-forward` to a cluster, whose cores /proc/stat cannot see."""
    import psutil

    try:
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                # Ray's metrics agent, or `make serve`'s bridge into a loopback
                # namespace of this machine (scripts/loopback-serve)
                return any("/ray/" in part or part.startswith("ray::")
                           or part.endswith("uds_bridge.py")
                           for part in psutil.Process(c.pid).cmdline())
    except (psutil.Error, OSError):
        pass
    return False


def _busy_cores(series: dict, host: str | None,
                port: int | None = None) -> tuple[str, float] | None:
    """('ray', cores busy now) from Ray's node gauges; else, for a stack on this
    machine (a Ray process listens on `port`), ('proc', busy core-seconds so far)
    from /proc/stat; else None."""
    util = [v for (n, _), v in series.items() if n == "node_cpu_utilization"]
    count = [v for (n, _), v in series.items() if n == "node_cpu_count"]
    if util and count:
        return "ray", sum(u / 100 * c for u, c in zip(util, count, strict=False))
    if host in ("127.0.0.1", "localhost", "::1") and _ray_listens(port):
        return host_busy_core_seconds()
    return None


def host_busy_core_seconds() -> tuple[str, float] | None:
    """('proc', this machine's busy core-seconds so far) from /proc/stat, else None."""
    import os

    if not Path("/proc/stat").exists():
        return None
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return "proc", (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def record_profile(path: Path, model: str, key: str, prof: Profile) -> None:
    """Write one profile table into a lock-shaped TOML file, keeping its comments."""
    import tomlkit

    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    models = doc.setdefault("models", tomlkit.table(is_super_table=True))
    entry = models.setdefault(model, tomlkit.table())
    profiles = entry.setdefault("profiles", tomlkit.table(is_super_table=True))
    table = tomlkit.table()
    for field, value in prof.model_dump().items():
        if isinstance(value, dict):
            inline = tomlkit.inline_table()
            inline.update({str(k): v for k, v in value.items()})
            value = inline
        table[field] = value
    table.add(tomlkit.nl())
    profiles[key] = table
    path.write_text(tomlkit.dumps(doc))
