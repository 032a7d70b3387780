"""Cell crops at the physical field of view a model was trained on.

A model bundle records the scale of its input (``meta["um_per_px"]``, µm per input
pixel) and its ``input_size``; their product is the field of view it saw in training
(29 µm for LMU-like crops). A crop around a detected cell covers that same field of
view in the smear's own pixels, and the bundle's pipeline (:mod:`leukoscope.models.pipeline`,
the one place where an image becomes a model input) white-balances and resamples it, so that a cell
imaged at 0.1 µm/px and at 0.07 µm/px reaches the model at the same size.

Where a crop leaves the field (a cell at the border, or a field smaller than the field of
view), it is padded with the field's background colour (:func:`background_colour`), never
mirrored: a reflected border invents cells (a "kaleidoscope") that the model would
classify. A cell whose model input is mostly padding (more than :data:`MAX_PADDING_FRACTION`,
:func:`padding_fractions`) is referred by the screen as "mostly outside the field".

For people, :func:`native_square` gives the square a reviewer sees (the cell's box plus
:data:`CROP_MARGIN`, at least :data:`MIN_CROP_UM`) at the field's own resolution.

>>> import numpy as np
>>> crop = cell_crop(np.zeros((500, 500, 3), np.uint8), 250, 250, size_px=100)
>>> crop.shape
(100, 100, 3)
>>> cell_crop(np.full((50, 50, 3), 230, np.uint8), 5, 5, 40, background=(230, 225, 220))[0, 0].tolist()
[230, 225, 220]
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from leukoscope.imaging.scale import LMU_UM_PER_PX
from leukoscope.io import atomic_write_bytes
from leukoscope.models.pipeline import Pipeline

#: Field of view when a bundle does not record its scale: an LMU crop (400 px x 29/400 µm/px).
DEFAULT_FOV_UM = 400 * LMU_UM_PER_PX
#: A model input with more than this fraction of padding (outside the field) is not classified but referred.
MAX_PADDING_FRACTION = 0.5
#: Margin around a cell's box in its crop for people, as a fraction of the box's longer side (each side).
CROP_MARGIN = 0.25
#: Smallest side of a crop for people in µm where the field's scale is known: at least the field of view of an
#: LMU single-cell image (400 px x 0.0725 µm/px = 29 µm), so that exported crops (export-labels) give
#: a model the same context as the screen's model inputs instead of padding.
MIN_CROP_UM = 30.0


def model_fov_um(meta: dict) -> float:
    """Field of view (µm) of a model's input: ``um_per_px * input_size``, else the LMU 29 µm."""
    um, size = meta.get("um_per_px"), meta.get("input_size")
    if um and size and math.isfinite(float(um)) and float(um) > 0:
        return float(um) * int(size)
    return DEFAULT_FOV_UM


def crop_size_px(fov_um: float, um_per_px: float) -> int:
    """Side (px) of a square crop covering ``fov_um`` at ``um_per_px``."""
    return max(1, int(round(fov_um / um_per_px)))


def background_colour(img: np.ndarray) -> np.ndarray:
    """The field's background colour (RGB uint8): the per-channel median of its brightest fifth.

    Cells are darker than the glass between them, so the brightest pixels are background even in a
    crowded field (the same rule as the detector's calibration, :func:`leukoscope.screen.detect.calibrate`).
    """
    img = np.asarray(img)
    if img.size == 0:
        raise ValueError("cannot take the background colour of an empty image")
    px = img.reshape(-1, img.shape[-1])[:, :3]
    if len(px) > 1_000_000:  # a large region: every k-th pixel is plenty
        px = px[:: len(px) // 1_000_000]
    lum = px.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    bright = lum >= np.percentile(lum, 80)
    return np.median(px[bright], axis=0).round().astype(np.uint8)


def _window(h: int, w: int, cx: float, cy: float, size_px: int) -> tuple[int, int, int, int]:
    x0 = int(round(cx - size_px / 2))
    y0 = int(round(cy - size_px / 2))
    return x0, y0, x0 + size_px, y0 + size_px


def padding_fraction(h: int, w: int, cx: float, cy: float, size_px: int) -> float:
    """Fraction of a ``size_px`` square centred on (cx, cy) that lies outside an ``h x w`` image."""
    x0, y0, x1, y1 = _window(h, w, cx, cy, size_px)
    inside = max(0, min(w, x1) - max(0, x0)) * max(0, min(h, y1) - max(0, y0))
    return 1.0 - inside / float(size_px * size_px)


def cell_crop(img: np.ndarray, cx: float, cy: float, size_px: int, background=None) -> np.ndarray:
    """Square ``size_px`` crop of ``img`` centred on (cx, cy); padded with ``background`` where it leaves
    the image (an RGB colour; default :func:`background_colour` of ``img``).

    Never mirrored (a reflection would invent cells) and never black (a black border would be a feature
    no training crop had).
    """
    h, w = img.shape[:2]
    x0, y0, x1, y1 = _window(h, w, cx, cy, size_px)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 <= sx0 or sy1 <= sy0:
        raise ValueError(f"crop centre ({cx:.0f}, {cy:.0f}) lies outside the {w}x{h} image")
    region = img[sy0:sy1, sx0:sx1]
    if (sx0, sy0, sx1, sy1) == (x0, y0, x1, y1):
        return np.ascontiguousarray(region)
    fill = background_colour(img) if background is None else np.asarray(background, dtype=img.dtype)
    out = np.empty((size_px, size_px) + img.shape[2:], img.dtype)
    out[...] = fill
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = region
    return out


def native_square(x0: float, y0: float, x1: float, y1: float, um_per_px: float | None = None
                  ) -> tuple[float, float, int]:
    """``(cx, cy, side)``: the square a person sees around a cell's box (its longer side plus
    :data:`CROP_MARGIN` each side and 8 px, at least :data:`MIN_CROP_UM` where the scale is known)."""
    side = max(x1 - x0, y1 - y0)
    side = int(math.ceil(side * (1 + 2 * CROP_MARGIN))) + 8
    if um_per_px and um_per_px > 0:
        side = max(side, int(math.ceil(MIN_CROP_UM / um_per_px)))
    return (x0 + x1) / 2, (y0 + y1) / 2, side


def padding_fractions(shape: tuple[int, int], centres, um_per_px: float, meta: dict) -> np.ndarray:
    """Fraction of each model input (:func:`model_crops`) that is padding outside an image of ``shape``."""
    side = crop_size_px(model_fov_um(meta), um_per_px)
    h, w = shape[:2]
    return np.array([padding_fraction(h, w, cx, cy, side) for cx, cy in centres], dtype=np.float64)


def model_crops(img: np.ndarray, centres, um_per_px: float, meta: dict, background=None) -> np.ndarray:
    """``(n, S, S, 3)`` uint8 model inputs for cells at ``centres`` ((cx, cy) in ``img`` px).

    Each crop covers the model's field of view and goes through the bundle's own preprocessing
    pipeline (:class:`leukoscope.models.pipeline.Pipeline`: white balance when the model was
    trained so, physical scale, crop/pad): exactly the input the model classifies and the review
    page's saliency explains. Crops leaving ``img`` are padded with ``background`` (default: the
    :func:`background_colour` of ``img``).
    """
    size = int(meta["input_size"])
    side = crop_size_px(model_fov_um(meta), um_per_px)
    pipe = Pipeline.from_meta(meta).with_model_scale(meta.get("um_per_px") or (DEFAULT_FOV_UM / size))
    out = np.empty((len(centres), size, size, 3), np.uint8)
    fill = None
    for i, (cx, cy) in enumerate(centres):
        if fill is None and background is None and padding_fraction(*img.shape[:2], cx, cy, side) > 0:
            fill = background_colour(img)  # once per image, only when a crop needs it
        out[i] = pipe.prepare(cell_crop(img, cx, cy, side, background if background is not None else fill),
                              um_per_px)
    return out


def png_bytes(arr: np.ndarray) -> bytes:
    """An RGB uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def native_crop(read, shape: tuple[int, int], box, um_per_px: float | None, background) -> np.ndarray:
    """The :func:`native_square` crop of a cell's ``box`` (x0, y0, x1, y1) at the field's own resolution.

    ``read(y0, x0, y1, x1)`` reads a region of the field (:meth:`leukoscope.screen.tiles.Smear.read`),
    ``shape`` is the field's (h, w); outside the field the crop is ``background``.
    """
    h, w = shape
    cx, cy, side = native_square(*box, um_per_px)
    ox, oy = int(round(cx - side / 2)), int(round(cy - side / 2))
    rx0, ry0, rx1, ry1 = max(0, ox), max(0, oy), min(w, ox + side), min(h, oy + side)
    return cell_crop(read(ry0, rx0, ry1, rx1), cx - rx0, cy - ry0, side, background)


def write_native_crops(read, shape: tuple[int, int], boxes, um_per_px: float | None, background,
                       out_dir: str | os.PathLike, sub: str) -> list[str]:
    """Write each box's :func:`native_crop` as ``out_dir/sub/<x0>_<y0>_<x1>_<y1>.png`` (atomically, one at a
    time: memory stays that of one crop) and return the paths relative to ``out_dir``."""
    rels = []
    for x0, y0, x1, y1 in boxes:
        rel = f"{sub}/{int(x0)}_{int(y0)}_{int(x1)}_{int(y1)}.png"
        atomic_write_bytes(png_bytes(native_crop(read, shape, (x0, y0, x1, y1), um_per_px, background)),
                           Path(out_dir) / rel)
        rels.append(rel)
    return rels
