"""`imagegen ...`: serve, generate, models, bench. Heavy imports stay inside commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ImagegenError


def _settings(args: argparse.Namespace):
    from .config import load_settings

    return load_settings(
        getattr(args, "config", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        metrics_port=getattr(args, "metrics_port", None),
        engine=getattr(args, "engine", None),
        threads=getattr(args, "threads", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .local import run_local

    return run_local(_settings(args))


def cmd_generate(args: argparse.Namespace) -> int:
    import base64

    import httpx

    body = {"prompt": args.prompt, "tier": args.tier, "n": args.n}
    for key in ("negative_prompt", "size", "seed", "steps", "guidance"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    try:
        r = httpx.post(f"{args.url.rstrip('/')}/v1/images", json=body, timeout=args.timeout)
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    data = r.json()
    if r.status_code != 200:
        err = data.get("error", {})
        print(f"error {r.status_code} {err.get('code')}: {err.get('message')}", file=sys.stderr)
        return 1
    out = Path(args.output)
    for i, img in enumerate(data["images"]):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        path.write_bytes(base64.b64decode(img["b64_json"]))
        print(f"{path}  seed={img['seed']} {img['width']}x{img['height']}")
    t = data["timings"]
    print(
        f"model {data['model']}@{data['revision'][:12]} tier={data['tier']} "
        f"queue {t['queue_ms']:.0f} ms, generate {t['generate_ms']:.0f} ms, "
        f"batch of {data['batch_images']}, request {data['id']}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from . import models_cli

    return models_cli.run(args, _settings(args))


def cmd_capacity(args: argparse.Namespace) -> int:
    from . import capacity_cli

    return capacity_cli.run(args, _settings(args))


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "capacity":
        from . import capacity_bench

        return capacity_bench.run(args, _settings(args))
    from .bench import run_bench

    return run_bench(args, _settings(args))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagegen", description=__doc__)
    p.add_argument("--config", type=Path, help="settings YAML (see README § Settings)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the local service (Ray + Serve) until Ctrl-C")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default 8000)")
    s.add_argument("--metrics-port", type=int, help="Ray's /metrics port (default 8080)")
    s.add_argument("--engine", choices=["diffusers", "fake"])
    s.add_argument("--threads", type=int, help="torch threads per CPU replica")
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="call a running service and save the images")
    g.add_argument("prompt")
    g.add_argument("--tier", default="draft")
    g.add_argument("-n", type=int, default=1)
    g.add_argument("--size", help="WIDTHxHEIGHT")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--negative-prompt", dest="negative_prompt")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--url", default="http://127.0.0.1:8000")
    g.add_argument("--timeout", type=float, default=300.0)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="build, list, verify, hash or fetch models.lock entries")
    msub = m.add_subparsers(dest="models_command", required=True)
    mb = msub.add_parser("build", help="build the builtin tiny models (deterministic)")
    mb.add_argument("--force", action="store_true", help="rebuild even if present")
    msub.add_parser("list", help="every revision with its source, licence and state")
    msub.add_parser("verify", help="check every file's sha256 against the lock")
    mh = msub.add_parser("hash", help="print a [models.NAME.files] table for a directory")
    mh.add_argument("name")
    mh.add_argument("directory", type=Path)
    mf = msub.add_parser("fetch", help="download hub entries at their pinned commit")
    mf.add_argument("names", nargs="*")
    m.set_defaults(func=cmd_models)

    from .capacity_cli import add_parser as add_capacity

    add_capacity(sub)
    sub.choices["capacity"].set_defaults(func=cmd_capacity)

    b = sub.add_parser("bench", help="benchmarks (not tests)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bs = bsub.add_parser("serve", help="in-process pipeline vs the full HTTP stack")
    bs.add_argument("--model", default="tiny-draft")
    bs.add_argument("--requests", type=int, default=200, help="requests per measured point")
    bs.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    bs.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    bs.add_argument("--port", type=int, default=8123)
    bs.add_argument("--json", type=Path, help="also write the figures as JSON")
    bc = bsub.add_parser("capacity", help="planner prediction vs the stack under Poisson load")
    bc.add_argument("--tier", default="draft")
    bc.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40])
    bc.add_argument("--duration", type=float, default=60.0, help="seconds per rate")
    bc.add_argument("--cv", type=float, default=0.1, help="planner's batch time CV")
    bc.add_argument("--overhead-ms", type=float, default=15.0,
                    help="planner's per-request stack overhead (bench serve's added p50)")
    bc.add_argument("--port", type=int, default=8123)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ImagegenError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
