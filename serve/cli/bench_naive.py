"""`imagegen bench naive`: the baseline to beat. The same tiny pipeline served the
straightforward way on Ray Serve (a FastAPI ingress deployment -> a model deployment
calling the project's DiffusersEngine one request at a time, no batching, PNG base64
in JSON), side by side in one run with the pipeline in this process and the imagegen
stack, at equal resources (one model replica, one torch thread; imagegen as in
`bench serve --peers`), in interleaved rounds: c=1 p50 (added over in-process) and
c=16 images/s (x in-process batched). One Serve runs at a time. Timings are printed,
never asserted."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path

from .bench_peers import BATCH, LOADED, PROMPT

# (key, table label); the first is the baseline every ratio is taken against.
SYSTEMS = (
    ("in-process", "in-process pipeline"),
    ("naive", "Ray Serve, FastAPI ingress -> model, no batching"),
    ("imagegen", "imagegen (policy: {model} 1 replica, cpu_threads 1)"),
)
APP_NAME = "naive"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-draft")
    p.add_argument("--requests", type=int, default=100, help="requests per c=1 point "
                   f"(the c={LOADED} point sends at least {4 * LOADED})")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--skip-imagegen", action="store_true",
                   help="only in-process and the naive layout (one Serve start per round)")
    p.add_argument("--port", type=int, default=8123, help="HTTP port of both Serve stacks")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


def naive_app(spec, job):
    """The straightforward Serve application: what a Ray Serve user writes first.
    Replica code imports `serve.*` absolutely: it is pickled by value into Ray's
    workers, where a relative import has no package to resolve against."""
    import base64
    from dataclasses import replace

    from fastapi import FastAPI
    from ray import serve as ray_serve

    api = FastAPI()
    quiet = {"enable_access_log": False}  # a log line per request would be timed too

    # One request at a time: Serve's default (5, sync methods on a thread pool) runs
    # pipelines on threads side by side, which made the tiny pipeline 2x slower here.
    @ray_serve.deployment(name="NaiveModel", max_ongoing_requests=1,
                          ray_actor_options={"num_cpus": 1}, logging_config=quiet)
    class NaiveModel:
        def __init__(self, spec, job) -> None:
            from serve.engines.diffusers_engine import DiffusersEngine

            self.engine = DiffusersEngine(spec)
            self.engine.load()
            self.engine.warmup(job)
            self.job = job

        def generate(self, prompt: str, seed: int) -> bytes:
            from serve.imaging import encode

            image = self.engine.generate([replace(self.job, prompt=prompt, seed=seed)])[0]
            return encode(image, "png")

    @ray_serve.deployment(name="NaiveIngress", logging_config=quiet)
    @ray_serve.ingress(api)
    class NaiveIngress:
        def __init__(self, model) -> None:
            self.model = model

        @api.post("/v1/images")
        async def generate(self, body: dict) -> dict:
            png = await self.model.generate.remote(body.get("prompt", PROMPT),
                                                   int(body.get("seed", 0)))
            return {"images": [{"b64_json": base64.b64encode(png).decode()}],
                    "batch_images": 1}

    return NaiveIngress.bind(NaiveModel.bind(spec, job))


@contextlib.contextmanager
def _serve_defaults() -> Iterator[None]:
    """The naive layout runs on Serve's defaults, with the proxy: no RAY_SERVE_*
    variable of this process (a user's, say) reaches its ray.init."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RAY_SERVE_")}
    try:
        yield
    finally:
        os.environ.update(saved)


def _wait_port(port: int, deadline_s: float = 60.0) -> None:
    from .bench_peers import _port_free

    deadline = time.monotonic() + deadline_s
    while not _port_free(port):  # the last stack's replicas may still be exiting
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} is in use; choose --port")
        time.sleep(0.5)


def naive_sample(entry, settings, round_: int, n: int):
    import ray
    from ray import serve as ray_serve

    from .. import local
    from ..engines.base import Job
    from .bench import engine_spec
    from .bench_peers import measure_http

    d = entry.defaults
    spec = engine_spec(entry, settings, 1)
    job = Job(PROMPT, "", d.width, d.height, d.steps, d.guidance, 0)
    _wait_port(settings.port)
    with _serve_defaults():
        if not ray.is_initialized():
            local._init_ray(settings, None)
        try:
            ray_serve.start(http_options={"host": settings.host, "port": settings.port},
                            logging_config={"enable_access_log": False})
            ray_serve.run(naive_app(spec, job), name=APP_NAME, route_prefix="/")
            return measure_http("naive", round_,
                                f"http://{settings.host}:{settings.port}/v1/images",
                                lambda seed: {"prompt": PROMPT, "seed": seed}, n)
        finally:
            local.stop()


def vs_naive(rows) -> dict[str, float]:
    """imagegen against the naive layout: the p50 difference at c=1 (negative: faster)
    and the throughput ratio at c=LOADED, from the rows' medians."""
    by = {r.system: r for r in rows}
    if "naive" not in by or "imagegen" not in by:
        return {}
    ours, naive = by["imagegen"], by["naive"]
    return {"p50_ms_c1_minus_naive": ours.p50_ms.median - naive.p50_ms.median,
            f"throughput_x_naive_c{LOADED}": ours.images_per_s.median
            / naive.images_per_s.median}


def run(args: argparse.Namespace, settings) -> int:
    import yaml

    from ..lockfile import load_lock
    from ..routing import load_routing
    from ..tinymodels import build_missing
    from .bench_peers import (
        imagegen_sample,
        in_process_sample,
        one_replica_policy,
        summarize,
        table,
    )

    if args.rounds < 1 or args.requests < 1:
        print("--rounds and --requests must be at least 1")
        return 2
    build_missing(settings.lock_file, settings.model_dir)
    lock = load_lock(settings.lock_file)
    entry = lock.get(args.model)
    tiers = load_routing(settings.routing_file, lock).tiers_of(entry.name)
    systems = dict(SYSTEMS)
    if args.skip_imagegen or not tiers:
        systems.pop("imagegen")
    names = {k: v.format(model=entry.name) for k, v in systems.items()}
    stack = None
    if "imagegen" in systems:
        import tempfile

        policy = Path(tempfile.mkdtemp(prefix="imagegen-bench-")) / "policy.yaml"
        policy.write_text(yaml.safe_dump(one_replica_policy(
            yaml.safe_load(settings.policy_file.read_text()), entry.name)))
        stack = settings.model_copy(update={
            "port": args.port, "grpc_port": 0, "threads": None, "engine": "diffusers",
            "policy_file": policy, "image_classifier": "none"})
    naive_settings = settings.model_copy(update={"port": args.port})
    samples = []
    for r in range(args.rounds):
        samples.append(in_process_sample(entry, settings, r, args.requests))
        # Alternate which Serve goes first: neither always inherits a warm page cache.
        serves = [partial(naive_sample, entry, naive_settings, r, args.requests)]
        if stack is not None:
            serves.append(partial(imagegen_sample, stack, tiers[0], r, args.requests))
        for measure in serves if r % 2 == 0 else serves[::-1]:
            samples.append(measure())
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{s.system} {s.p50_ms:.1f} ms / {s.images_per_s:.1f} img/s"
            for s in samples if s.round == r))
    rows = summarize(samples, names)
    extra = vs_naive(rows)
    d = entry.defaults
    print(f"\nimagegen bench naive — {len(os.sched_getaffinity(0))} cores; {entry.name} "
          f"{d.width}x{d.height} {d.steps} steps; one model replica, one torch thread; "
          f"in-process batches of {BATCH}; {args.rounds} interleaved round(s), "
          f"{args.requests} requests per point; median (min to max)\n")
    print(table(rows))
    if extra:
        print(f"\nimagegen vs the naive layout: {extra['p50_ms_c1_minus_naive']:+.1f} ms at "
              f"c=1, {extra[f'throughput_x_naive_c{LOADED}']:.2f}x images/s at c={LOADED}")
    if not tiers and not args.skip_imagegen:
        print(f"(no imagegen row: no tier routes {entry.name})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": entry.name, "rounds": args.rounds, "requests": args.requests,
            "concurrency": [1, LOADED], "batch": BATCH,
            "cores": len(os.sched_getaffinity(0)), "samples": [asdict(s) for s in samples],
            "rows": [asdict(r) for r in rows], "imagegen_vs_naive": extra}, indent=2))
    return 0
