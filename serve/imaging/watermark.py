"""Watermarks for plans that require one: an invisible mark (invisible-watermark's
DWT-DCT-SVD embedding in the U channel, carrying a short payload and its CRC-32) and
a small visible corner label.

Why dwtDctSvd and not dwtDct (what SDXL ships): measured here, dwtDct's bits read
back near chance after JPEG q85 or WebP q80, which is how most images leave the
service; dwtDctSvd's read back whole. Neither survives reading at another scale, so
`detect` takes the size the image was marked at and scales a resized copy back first.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import zlib

import cv2
import numpy as np
import pywt
from PIL import Image, ImageDraw, ImageFont

MIN_PIXELS = 256 * 256  # fewer than this: too few blocks to carry the mark
MAX_PAYLOAD_BYTES = 16
# Quantisation step of the embedding (the library's default is 36). Measured on
# three images at 512 and 1024, through JPEG q85, WebP q80, AVIF q60 and a 0.75x
# resize: 72 recovers every payload; 48 and 60 miss 2 or 3 of the 24 (WebP, mostly).
# It costs ~36 dB of PSNR, all in the U channel.
SCALE = 72
_CRC_BYTES = 4
CHASE_BITS = 8  # weakest bits detect may flip to repair a mark: 256 CRC checks


@functools.cache
def _embedder_class():
    # imwatermark/__init__.py imports its rivaGan module, which imports torch (~1.5 s
    # here): only the diffusers engine may import torch. The one module used here
    # needs numpy, cv2 and pywt only, so load it alone, without the package.
    spec = importlib.util.find_spec("imwatermark")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("invisible-watermark is not installed (pip install --no-deps "
                          "invisible-watermark==0.2.0 PyWavelets)")
    path = f"{spec.submodule_search_locations[0]}/dwtDctSvd.py"
    module_spec = importlib.util.spec_from_file_location("imwatermark_dwtdctsvd", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.EmbedDwtDctSvd


def _check(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise ValueError(f"image must be an HxWx3 uint8 array, got "
                         f"{getattr(image, 'shape', type(image).__name__)}")


def _bgr(image: np.ndarray) -> np.ndarray:
    # Float, as SDXL's watermarker passes it: the embedding's result written back
    # into a uint8 array would truncate, and wrap at 0 and 255.
    return np.ascontiguousarray(image[:, :, ::-1], dtype=np.float32)


def _framed(payload: bytes) -> bytes:
    return payload + zlib.crc32(payload).to_bytes(_CRC_BYTES, "big")


def markable(image: np.ndarray) -> bool:
    """Whether `image` is large enough to carry the invisible mark."""
    return image.shape[0] * image.shape[1] >= MIN_PIXELS


def apply(image: np.ndarray, payload: bytes) -> np.ndarray:
    """`image` (HxWx3 uint8) carrying `payload` (1..16 bytes) invisibly. An image of
    fewer than 256x256 pixels cannot carry it and comes back unchanged (the same
    array): give those `visible` instead where a plan needs a mark."""
    _check(image)
    if not isinstance(payload, bytes) or not 1 <= len(payload) <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload must be 1 to {MAX_PAYLOAD_BYTES} bytes, got {payload!r}")
    if not markable(image):
        return image
    bits = np.unpackbits(np.frombuffer(_framed(payload), dtype=np.uint8))
    embed = _embedder_class()(watermarks=bits.tolist(), wmLen=len(bits), scales=[0, SCALE, 0])
    yuv, approx, details = _u_band(image)
    embed.encode_frame(approx, SCALE)  # in place
    h, w = approx.shape[0] * 2, approx.shape[1] * 2
    yuv[:h, :w, 1] = pywt.idwt2((approx, details), "haar")
    rgb = cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[:, :, ::-1]
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _u_band(image: np.ndarray):
    # The library's own encode() does this with the wavelet's horizontal and vertical
    # detail bands swapped on the way back (it hands idwt2 (v, h, d)): a chroma error
    # of up to ~110 levels on textured images even at scale 1. So only its embedding
    # (encode_frame) and its per-block reading (decode_frame) are used; the colour
    # conversion and the transform around them are done here.
    yuv = cv2.cvtColor(_bgr(image), cv2.COLOR_BGR2YUV)
    h, w = image.shape[0] // 4 * 4, image.shape[1] // 4 * 4
    approx, details = pywt.dwt2(yuv[:h, :w, 1], "haar")
    return yuv, approx, details


def _scores(image: np.ndarray, n_bytes: int, size: tuple[int, int] | None) -> np.ndarray | None:
    # Per framed bit, the share of its blocks that read 1 (about 0.5: no signal).
    _check(image)
    if size is not None and (image.shape[1], image.shape[0]) != tuple(size):
        image = np.asarray(Image.fromarray(image).resize(tuple(size), Image.BICUBIC))
    if not markable(image):
        return None
    n_bits = (n_bytes + _CRC_BYTES) * 8
    embed = _embedder_class()(watermarks=[], wmLen=n_bits, scales=[0, SCALE, 0])
    votes = embed.decode_frame(_u_band(image)[1], SCALE, [[] for _ in range(n_bits)])
    return np.array([np.mean(v) for v in votes])


def detect(image: np.ndarray, length_bytes: int, *,
           size: tuple[int, int] | None = None) -> bytes | None:
    """The `length_bytes` payload `apply` put in `image`, or None: no mark, one damaged
    past repair, or an image too small to carry one. `size` (width, height) is the
    size it was marked at: a resized copy is scaled back to it before reading."""
    if not 1 <= length_bytes <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"length_bytes {length_bytes!r} is not 1 to {MAX_PAYLOAD_BYTES}")
    scores = _scores(image, length_bytes, size)
    if scores is None:
        return None
    bits = scores >= 0.5
    # Chase decoding: the bits a lossy encode flips are those read with the least
    # agreement between their blocks, so try every flip of the CHASE_BITS weakest,
    # fewest flips first, against the CRC (2^-32 a try: ~6e-8 false marks an image).
    weakest = np.argsort(np.abs(scores - 0.5), kind="stable")[:CHASE_BITS]
    for r in range(CHASE_BITS + 1):
        for flips in itertools.combinations(weakest, r):
            trial = bits.copy()
            trial[list(flips)] ^= True
            framed = np.packbits(trial).tobytes()
            if framed == _framed(framed[:length_bytes]):
                return framed[:length_bytes]
    return None


def bit_accuracy(image: np.ndarray, payload: bytes, *,
                 size: tuple[int, int] | None = None) -> float:
    """The share of the mark's bits (payload and CRC) that read back from `image` as
    `apply` wrote them, before any repair: 1.0 intact, about 0.5 chance. For
    benchmarks and tests."""
    scores = _scores(image, len(payload), size)
    if scores is None:
        return 0.0
    want = np.unpackbits(np.frombuffer(_framed(payload), dtype=np.uint8)).astype(bool)
    return float(((scores >= 0.5) == want).mean())


def visible(image: np.ndarray, text: str = "AI") -> np.ndarray:
    """`image` with `text` in a semi-transparent label in its bottom-right corner, sized
    to the image (a mark for plans that want one seen, and for images too small to
    carry the invisible one)."""
    _check(image)
    h, w = image.shape[:2]
    font = ImageFont.load_default(size=max(8, min(w, h) // 12))
    left, top, right, bottom = font.getbbox(text)
    pad = max(2, (bottom - top) // 3)
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    x0, y0 = max(0, w - box_w - pad), max(0, h - box_h - pad)
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rounded_rectangle((x0, y0, x0 + box_w, y0 + box_h), radius=pad, fill=(0, 0, 0, 110))
    draw.text((x0 + pad - left, y0 + pad - top), text, font=font, fill=(255, 255, 255, 200))
    base = Image.fromarray(image, mode="RGB").convert("RGBA")
    return np.asarray(Image.alpha_composite(base, overlay).convert("RGB"))
