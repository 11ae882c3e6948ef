"""Aspect ratios -> pixel sizes: the size nearest a target area at each "W:H" ratio,
on the model's grid (`multiple`) and inside its limits. Pure."""

from __future__ import annotations

import math
import re

MAX_RATIO_TERM = 32  # "32:1" is the most extreme ratio accepted
_RATIO = re.compile(r"([0-9]+):([0-9]+)")  # ASCII digits: int() takes others


def parse_ratio(ratio: str) -> tuple[int, int]:
    """ "16:9" -> (16, 9); each term an integer from 1 to MAX_RATIO_TERM."""
    m = _RATIO.fullmatch(ratio.strip()) if isinstance(ratio, str) else None
    if m is None or not all(1 <= int(t) <= MAX_RATIO_TERM for t in m.groups()):
        raise ValueError(f"aspect ratio {ratio!r} is not W:H with integers from 1 to "
                         f"{MAX_RATIO_TERM}")
    return int(m[1]), int(m[2])


def sizes_for(ratios: list[str], megapixels: float, multiple: int, min_size: int,
              max_width: int, max_height: int) -> list[tuple[int, int]]:
    """(width, height) for each "W:H" in `ratios`, in order: the ratio as exactly as
    rounding both sides to `multiple` allows, at the area nearest `megapixels` million
    pixels. A size the limits cut is scaled down (or up, to `min_size`) whole, keeping
    the ratio; only a ratio the limits cannot hold at all has a side pinned to a limit."""
    if not megapixels > 0:
        raise ValueError(f"megapixels {megapixels!r} is not positive")
    if multiple < 1:
        raise ValueError(f"multiple {multiple!r} is not a positive integer")
    if min_size < 1:
        raise ValueError(f"min_size {min_size!r} is not positive")
    lo = math.ceil(min_size / multiple) * multiple
    hi_w, hi_h = max_width // multiple * multiple, max_height // multiple * multiple
    if lo > min(hi_w, hi_h):
        raise ValueError(f"no multiple of {multiple} lies in [{min_size}, "
                         f"{min(max_width, max_height)}]")
    return [_size(parse_ratio(r), megapixels * 1e6, multiple, lo, hi_w, hi_h) for r in ratios]


def _size(ratio: tuple[int, int], area: float, multiple: int, lo: int, hi_w: int,
          hi_h: int) -> tuple[int, int]:
    r = ratio[0] / ratio[1]
    w, h = math.sqrt(area * r), math.sqrt(area / r)
    # Scale whole first (the ratio holds), then pin whichever side still cannot fit.
    s = min(1.0, hi_w / w, hi_h / h)
    s = max(s, lo / w, lo / h)
    w, h = min(max(w * s, lo), hi_w), min(max(h * s, lo), hi_h)

    def near(x: float, hi: int) -> set[int]:
        # The epsilon: a side scaled to exactly a limit can land a hair under it.
        down = max(lo, min(hi, math.floor(x / multiple + 1e-9) * multiple))
        up = max(lo, min(hi, math.ceil(x / multiple - 1e-9) * multiple))
        return {down, up}  # one size where x is on the grid

    # Ratio error first, then distance from the (clamped) target area, then the larger:
    # all symmetric, so "9:16" is always "16:9" turned.
    return min(((cw, ch) for cw in near(w, hi_w) for ch in near(h, hi_h)),
               key=lambda c: (round(abs(math.log(c[0] / c[1] / r)), 9),
                              round(abs(c[0] * c[1] - w * h), 6), -c[0] * c[1], c))
