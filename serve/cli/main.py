"""`imagegen ...`: serve, generate, batch, models, keys, quota, templates, review,
routing, fallback, storage, capacity, render, bench, loadtest.
Heavy imports stay inside each verb's `run`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ImagegenError
from . import (
    batch,
    bench,
    capacity,
    fallback,
    generate,
    keys,
    loadtest,
    models,
    quota,
    render,
    review,
    routing,
    storage,
    templates,
)
from . import serve as serve_verb

VERBS = (serve_verb, generate, batch, models, keys, quota, templates, review, routing,
         fallback, storage, capacity, render, bench, loadtest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagegen", description="image generation on Ray Serve: run, call, size and "
        "benchmark the service (README.md)")
    p.add_argument("--config", type=Path, help="settings YAML (see README § Settings)")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add_parser(sub).set_defaults(func=verb.run)
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
