"""Cell crops at the physical field of view a model was trained on.

A model bundle records the scale of its input (``meta["um_per_px"]``, µm per input
pixel) and its ``input_size``; their product is the field of view it saw in training
(29 µm for LMU-like crops). A crop around a detected cell covers that same field of
view in the smear's own pixels, and the bundle's pipeline (:mod:`leukoscope.models.pipeline`,
the one place where an image becomes a model input) white-balances and resamples it, so that a cell
imaged at 0.1 µm/px and at 0.07 µm/px reaches the model at the same size.

>>> import numpy as np
>>> crop = cell_crop(np.zeros((500, 500, 3), np.uint8), 250, 250, size_px=100)
>>> crop.shape
(100, 100, 3)
"""

from __future__ import annotations

import math

import numpy as np

from leukoscope.imaging.scale import LMU_UM_PER_PX
from leukoscope.models.pipeline import Pipeline

#: Field of view when a bundle does not record its scale: an LMU crop (400 px x 29/400 µm/px).
DEFAULT_FOV_UM = 400 * LMU_UM_PER_PX


def model_fov_um(meta: dict) -> float:
    """Field of view (µm) of a model's input: ``um_per_px * input_size``, else the LMU 29 µm."""
    um, size = meta.get("um_per_px"), meta.get("input_size")
    if um and size and math.isfinite(float(um)) and float(um) > 0:
        return float(um) * int(size)
    return DEFAULT_FOV_UM


def crop_size_px(fov_um: float, um_per_px: float) -> int:
    """Side (px) of a square crop covering ``fov_um`` at ``um_per_px``."""
    return max(1, int(round(fov_um / um_per_px)))


def cell_crop(img: np.ndarray, cx: float, cy: float, size_px: int) -> np.ndarray:
    """Square ``size_px`` crop of ``img`` centred on (cx, cy); reflected where it leaves the image.

    Never padded with black: a black border would be a feature no training crop had.
    """
    h, w = img.shape[:2]
    x0 = int(round(cx - size_px / 2))
    y0 = int(round(cy - size_px / 2))
    x1, y1 = x0 + size_px, y0 + size_px
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 <= sx0 or sy1 <= sy0:
        raise ValueError(f"crop centre ({cx:.0f}, {cy:.0f}) lies outside the {w}x{h} image")
    region = img[sy0:sy1, sx0:sx1]
    pad = ((sy0 - y0, y1 - sy1), (sx0 - x0, x1 - sx1), (0, 0))
    if any(p for pair in pad[:2] for p in pair):
        mode = "reflect" if min(region.shape[:2]) > max(max(pad[0]), max(pad[1])) else "symmetric"
        try:
            region = np.pad(region, pad, mode=mode)
        except ValueError:
            region = np.pad(region, pad, mode="edge")
    return np.ascontiguousarray(region)


def model_crops(img: np.ndarray, centres, um_per_px: float, meta: dict) -> np.ndarray:
    """``(n, S, S, 3)`` uint8 model inputs for cells at ``centres`` ((cx, cy) in ``img`` px).

    Each crop covers the model's field of view and goes through the bundle's own preprocessing
    pipeline (:class:`leukoscope.models.pipeline.Pipeline`: white balance when the model was
    trained so, physical scale, crop/pad): exactly the input the model classifies and the review
    page's saliency explains.
    """
    size = int(meta["input_size"])
    side = crop_size_px(model_fov_um(meta), um_per_px)
    pipe = Pipeline.from_meta(meta).with_model_scale(meta.get("um_per_px") or (DEFAULT_FOV_UM / size))
    out = np.empty((len(centres), size, size, 3), np.uint8)
    for i, (cx, cy) in enumerate(centres):
        out[i] = pipe.prepare(cell_crop(img, cx, cy, side), um_per_px)
    return out
