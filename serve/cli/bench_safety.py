"""`imagegen bench safety`: what stage 9 (the image classifier scoring every generated
image) costs, side by side in one run: NudeNet in this process on one CPU thread, per
image size and batch; then the draft path through the local stack with no classifier,
with it on a thread of the ingress, and in its own deployment. Timings are printed,
never asserted."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

SIZES = (64, 512, 1024)  # square images, pixels a side
BATCHES = (1, 4)
# (layout, image_classifier, image_classifier_placement); the first is the baseline.
LAYOUTS = (("none", "none", "deployment"), ("ingress", "nudenet", "ingress"),
           ("deployment", "nudenet", "deployment"))
LOADED = 16  # the concurrency of the throughput point


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=80, help="requests per measured stack point")
    p.add_argument("--calls", type=int, default=25, help="classifier calls per in-process row")
    p.add_argument("--tier", default="draft")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--grpc-port", type=int, default=0,
                   help="0 (the default): no gRPC; only HTTP is measured")
    p.add_argument("--skip-stack", action="store_true", help="only the in-process classifier")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


@dataclass
class ClassifierRow:
    size: int
    batch: int
    calls: int
    p50_ms: float
    p95_ms: float
    images_per_s: float


@dataclass
class StackRow:
    layout: str
    classifier: str  # as the stack's /readyz names it: proof of the layout asked for
    p50_ms_c1: float
    p95_ms_c1: float
    images_per_s_loaded: float


def bench_classifier(calls: int) -> tuple[str, list[ClassifierRow]]:
    import numpy as np

    from ..safety.classifier import load_classifier
    from .bench import _pct

    classifier = load_classifier("nudenet", threads=1)
    rng = np.random.default_rng(0)
    rows = []
    for size in SIZES:
        for batch in BATCHES:
            # Noise: the model's cost does not depend on what the pixels show.
            images = [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(batch)]
            for _ in range(3):
                classifier.classify(images)  # warm-up
            lat = []
            t0 = time.perf_counter()
            for _ in tqdm(range(calls), desc=f"{classifier.name} {size}px x {batch}", leave=False):
                t = time.perf_counter()
                classifier.classify(images)
                lat.append(time.perf_counter() - t)
            wall = time.perf_counter() - t0
            rows.append(ClassifierRow(size, batch, calls, _pct(lat, 0.5), _pct(lat, 0.95),
                                      batch * calls / wall))
    return classifier.name, rows


def _classifier_on(base: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base + "/readyz", timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # 503 unready: the same body, with the reason
        body = json.load(e)
    s = body["image_safety"]
    return s["classifier"] if s["ready"] else f"{s['classifier']} (unready: {s['reason']})"


def _start_when_free(settings, deadline_s: float = 60.0) -> str:
    """local.start once the last stack's ports are free: the replicas of the one
    just stopped may still be exiting, holding them for a few seconds."""
    from .. import local
    from ..errors import ConfigError

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            local.check_ports(settings)
            break
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return local.start(settings)


def bench_layout(settings, layout: str, spec: str, placement: str, tier: str,
                 n: int) -> StackRow:
    from .. import local
    from .bench import _load, _pct, throwaway_key

    settings, key = throwaway_key(settings.model_copy(update={
        "image_classifier": spec, "image_classifier_placement": placement}))
    base = _start_when_free(settings)
    try:
        classifier = _classifier_on(base)
        load = partial(_load, base + "/v1/images", key,
                       {"prompt": "a lighthouse at dusk", "tier": tier})
        asyncio.run(load(10, 1))  # warm the handles, replicas and classifier sessions
        asyncio.run(load(2 * LOADED, LOADED))  # and let the replicas scale as under load
        lat, _, _ = asyncio.run(load(n, 1))
        loaded, wall, _ = asyncio.run(load(max(n, 4 * LOADED), LOADED))
    finally:
        local.stop()
    return StackRow(layout, classifier, _pct(lat, 0.5), _pct(lat, 0.95),
                    len(loaded) / wall)


def _report_classifier(name: str, rows: list[ClassifierRow]) -> None:
    print(f"\nimagegen bench safety — {name} in process, one CPU thread, {rows[0].calls} "
          "calls per row after 3 warm-up calls\n")
    print(f"{'image':<12}{'batch':>6}{'p50 ms':>9}{'p95 ms':>9}{'img/s':>8}")
    for r in rows:
        print(f"{f'{r.size}x{r.size}':<12}{r.batch:>6}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}"
              f"{r.images_per_s:>8.1f}")


def _report_stack(rows: list[StackRow], tier: str, n: int) -> dict[str, dict[str, float]]:
    none = rows[0]
    print(f"\nthe stack: POST /v1/images, tier {tier} at its default size, {n} requests "
          "per point, by where the classifier runs\n")
    print(f"{'layout':<12}{'classifier':<16}{'c=1 p50':>9}{'c=1 p95':>9}{'added p50':>11}"
          f"{f'c={LOADED} img/s':>13}{'x none':>8}")
    ratios = {}
    for r in rows:
        added, ratio = r.p50_ms_c1 - none.p50_ms_c1, r.images_per_s_loaded / none.images_per_s_loaded
        ratios[r.layout] = {"added_p50_ms_c1": added, f"throughput_ratio_c{LOADED}": ratio}
        print(f"{r.layout:<12}{r.classifier:<16}{r.p50_ms_c1:>9.1f}{r.p95_ms_c1:>9.1f}"
              f"{added:>+11.1f}{r.images_per_s_loaded:>13.1f}{ratio:>7.2f}x")
    return ratios


def run(args: argparse.Namespace, settings) -> int:
    from ..safety.classifier import ClassifierUnavailable

    try:
        name, classifier_rows = bench_classifier(args.calls)
    except ClassifierUnavailable as e:
        print(e)
        return 2
    _report_classifier(name, classifier_rows)
    figures: dict = {"classifier": name, "in_process": [asdict(r) for r in classifier_rows]}
    if not args.skip_stack:
        from ..tinymodels import build_missing

        build_missing(settings.lock_file, settings.model_dir)
        stack = settings.model_copy(update={
            "port": args.port, "grpc_port": args.grpc_port, "engine": "diffusers"})
        rows = [bench_layout(stack, *layout, args.tier, args.requests) for layout in LAYOUTS]
        figures["stack"] = [asdict(r) for r in rows]
        figures["ratios"] = _report_stack(rows, args.tier, args.requests)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0
