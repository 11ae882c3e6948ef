"""`imagegen bench encode`: what stage 10 costs an image, in this process on one
image at a time: encoding per format and size (p50 ms and bytes), the speed knob of
each lossy encoder side by side (how the defaults in serve/imaging/encode.py were
chosen), and the invisible watermark (apply, detect, how many of its bits read back
after JPEG q85, WebP q80 and a 0.75x resize, and whether detect recovered the
payload). Timings are printed, never asserted."""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

SIZES = (64, 512, 1024)  # square images, pixels a side
WATERMARK_SIZES = (512, 1024)
# The knob each lossy encoder trades time for bytes with; the default is marked.
KNOBS = {"webp": ("method", (0, 2, 4, 6)), "avif": ("speed", (4, 6, 8, 10)),
         "jpeg": ("optimize", (False, True))}
PAYLOAD = b"imagegen"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=11, help="timed calls per row")
    p.add_argument("--skip-knobs", action="store_true", help="no encoder knob comparison")
    p.add_argument("--skip-watermark", action="store_true", help="no watermark rows")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


@dataclass
class EncodeRow:
    fmt: str
    size: int
    setting: str
    p50_ms: float
    bytes: int
    psnr_db: float | None  # None: lossless


@dataclass
class WatermarkRow:
    size: int
    apply_p50_ms: float
    detect_p50_ms: float
    psnr_db: float
    bits_jpeg85: float
    bits_webp80: float
    bits_resized075: float
    bits_unmarked: float
    detected: list[str]  # the transforms after which detect() returned the payload


def scene(n: int, seed: int = 7) -> np.ndarray:
    """A deterministic n x n picture with what generated images have and noise lacks:
    a sky gradient, a sun, hills, hard-edged shapes and a little fine grain."""
    from PIL import Image, ImageDraw

    y = np.mgrid[0:n, 0:n][0] / n
    sky = np.stack([90 + 120 * y, 140 + 80 * y, 230 - 60 * y], axis=-1)
    im = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((0.62 * n, 0.1 * n, 0.82 * n, 0.3 * n), fill=(250, 220, 120))
    hills = [(i * n / 32, n * (0.62 + 0.06 * np.sin(i / 3.0))) for i in range(33)]
    d.polygon([(0, n), *hills, (n, n)], fill=(60, 120, 70))
    d.rectangle((0.15 * n, 0.45 * n, 0.35 * n, 0.75 * n), fill=(180, 70, 50))
    d.polygon([(0.12 * n, 0.45 * n), (0.25 * n, 0.33 * n), (0.38 * n, 0.45 * n)],
              fill=(110, 40, 40))
    grain = np.random.default_rng(seed).normal(0, 4, (n, n, 1))
    return np.clip(np.asarray(im, dtype=np.float64) + grain, 0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(1e-12, np.mean((a.astype(np.float64) - b) ** 2))))


def _decoded(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _row(fmt: str, n: int, setting: str, image: np.ndarray, fn, repeats: int) -> EncodeRow:
    data = fn()
    psnr = None if fmt == "png" else _psnr(_decoded(data), image)
    return EncodeRow(fmt, n, setting, _p50_ms(fn, repeats), len(data), psnr)


def _p50_ms(fn, repeats: int) -> float:
    fn()  # warm: codec tables, first allocation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_formats(images: dict[int, np.ndarray], repeats: int) -> list[EncodeRow]:
    from ..imaging import encode
    from ..imaging.encode import DEFAULT_QUALITY, FORMATS

    rows = []
    for fmt in FORMATS:
        setting = f"q{DEFAULT_QUALITY[fmt]}" if fmt in DEFAULT_QUALITY else "lossless"
        for n, image in images.items():
            rows.append(_row(fmt, n, setting, image, partial(encode, image, fmt), repeats))
    return rows


def _save(pil, fmt: str, quality: int, options: dict) -> bytes:
    buf = io.BytesIO()
    pil.save(buf, format=fmt.upper(), quality=quality, **options)
    return buf.getvalue()


def bench_knobs(images: dict[int, np.ndarray], repeats: int) -> list[EncodeRow]:
    from PIL import Image

    from ..imaging.encode import DEFAULT_QUALITY

    rows = []
    for fmt, (knob, values) in KNOBS.items():
        for n in (512, 1024):
            pil = Image.fromarray(images[n])
            for value in values:
                save = partial(_save, pil, fmt, DEFAULT_QUALITY[fmt], {knob: value})
                rows.append(_row(fmt, n, f"{knob}={value}", images[n], save, repeats))
    return rows


def bench_watermark(images: dict[int, np.ndarray], repeats: int) -> list[WatermarkRow]:
    from PIL import Image

    from ..imaging import encode
    from ..imaging import watermark as wm

    rows = []
    for n in WATERMARK_SIZES:
        image = images[n]
        marked = wm.apply(image, PAYLOAD)
        small = np.asarray(Image.fromarray(marked).resize((n * 3 // 4,) * 2, Image.BICUBIC))
        seen = {"jpeg85": _decoded(encode(marked, "jpeg", 85)),
                "webp80": _decoded(encode(marked, "webp", 80)), "0.75x": small}
        bits = {k: wm.bit_accuracy(v, PAYLOAD, size=(n, n)) for k, v in seen.items()}
        found = [k for k, v in seen.items() if wm.detect(v, len(PAYLOAD), size=(n, n)) == PAYLOAD]
        rows.append(WatermarkRow(
            n, _p50_ms(partial(wm.apply, image, PAYLOAD), repeats),
            _p50_ms(partial(wm.detect, marked, len(PAYLOAD)), repeats),
            _psnr(marked, image), bits["jpeg85"], bits["webp80"], bits["0.75x"],
            wm.bit_accuracy(image, PAYLOAD), found))
    return rows


def _print(rows: list[EncodeRow], wm_rows: list[WatermarkRow]) -> None:
    print(f"{'format':<7}{'size':>6}  {'setting':<16}{'p50 ms':>9}{'bytes':>10}{'bits/px':>9}"
          f"{'PSNR dB':>9}")
    for r in rows:
        psnr = "-" if r.psnr_db is None else f"{r.psnr_db:.1f}"
        print(f"{r.fmt:<7}{r.size:>6}  {r.setting:<16}{r.p50_ms:>9.2f}{r.bytes:>10}"
              f"{8 * r.bytes / r.size**2:>9.2f}{psnr:>9}")
    if wm_rows:
        print(f"\n{'watermark':<10}{'apply ms':>9}{'detect ms':>10}{'PSNR dB':>9}"
              f"{'bits: jpeg85':>14}{'webp80':>8}{'0.75x':>7}{'unmarked':>10}  detected after")
    for w in wm_rows:
        print(f"{w.size:<10}{w.apply_p50_ms:>9.1f}{w.detect_p50_ms:>10.1f}{w.psnr_db:>9.1f}"
              f"{w.bits_jpeg85:>14.2f}{w.bits_webp80:>8.2f}{w.bits_resized075:>7.2f}"
              f"{w.bits_unmarked:>10.2f}  {' '.join(w.detected) or '-'}")


def run(args: argparse.Namespace, settings) -> int:
    images = {n: scene(n) for n in SIZES}
    print(f"\nimagegen bench encode — one image at a time, p50 of {args.repeats} calls; "
          "a synthetic scene (gradient sky, shapes, fine grain)\n")
    rows = bench_formats(images, args.repeats)
    knob_rows = [] if args.skip_knobs else bench_knobs(images, max(3, args.repeats // 2))
    wm_rows = [] if args.skip_watermark else bench_watermark(images, max(3, args.repeats // 3))
    _print(rows + knob_rows, wm_rows)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"encode": [asdict(r) for r in rows], "knobs": [asdict(r) for r in knob_rows],
             "watermark": [asdict(w) for w in wm_rows]}, indent=2))
    return 0
