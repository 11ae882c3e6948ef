"""The safety blur: what stage 9 delivers for a `blur` verdict."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def blur(image: np.ndarray) -> np.ndarray:
    """What image safety delivers for a `blur` verdict: nothing recognisable left (a
    Gaussian of a tenth of the longer side, after a 16x downscale)."""
    h, w = image.shape[:2]
    small = Image.fromarray(image, mode="RGB").resize((max(1, w // 16), max(1, h // 16)),
                                                       Image.BILINEAR)
    small = small.filter(ImageFilter.GaussianBlur(max(1, max(w, h) // 160)))
    return np.asarray(small.resize((w, h), Image.BILINEAR))
