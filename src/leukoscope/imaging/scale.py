"""Physical scale: micrometres per pixel, and bringing images to a model's scale.

LMU crops are 400 px across and cover about 29 µm (100x oil immersion), i.e.
~0.0725 µm/px. A model records the µm/px of its training images; every image it
sees is resampled to that scale first, so that a cell has the same size in pixels
whatever microscope or scanner imaged it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Field of view of an LMU single-cell crop, in µm.
LMU_FIELD_UM = 29.0
#: LMU single-cell crops: 400 px ≈ 29 µm.
LMU_UM_PER_PX = LMU_FIELD_UM / 400.0


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 image by ``factor`` (bilinear/antialiased)."""
    if factor <= 0 or not np.isfinite(factor):
        raise ValueError(f"scale factor must be a positive number, got {factor}")
    if abs(factor - 1.0) < 1e-6:
        return img
    h, w = img.shape[:2]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR if factor > 1 else Image.LANCZOS))


def to_scale(img: np.ndarray, src_um_per_px: float | None, dst_um_per_px: float | None) -> np.ndarray:
    """Resample ``img`` from ``src`` µm/px to ``dst`` µm/px; a no-op when either is unknown."""
    if not src_um_per_px or not dst_um_per_px or not np.isfinite(src_um_per_px) or not np.isfinite(dst_um_per_px):
        return img
    return rescale(img, src_um_per_px / dst_um_per_px)


def center_crop_or_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or reflect-pad an image to ``size x size`` (never pads with black)."""
    h, w = img.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
        h, w = img.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[y0:y0 + size, x0:x0 + size])
