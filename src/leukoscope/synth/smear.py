"""Synthetic smear fields: red cells, platelets and leukocytes with ground-truth boxes.

A field of any size at any µm/px: leukocytes are drawn by the same class code as the
single cells (:func:`leukoscope.synth.cells.draw_leukocyte`) at the field's scale and
placed without overlapping one another; red cells (~7.5 µm) and platelets fill the
rest. Every cell is a local stamp, so a 4000 x 4000 field takes seconds.

>>> img, truth = make_smear(320, 240, n_leukocytes=["NGS"], seed=0)
>>> img.shape, list(truth.columns)
((240, 320, 3), ['x0', 'y0', 'x1', 'y1', 'cls'])
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from leukoscope import taxonomy
from leukoscope.imaging.scale import LMU_UM_PER_PX
from leukoscope.io import atomic_path, atomic_write_csv
from leukoscope.synth.cells import draw_leukocyte
from leukoscope.synth.field import render_field, sample_look

#: Default leukocyte density: one per this many µm² (a leukocyte-rich field; real
#: blood has ~1 leukocyte per 700 red cells, which would leave most fields empty).
UM2_PER_LEUKOCYTE = 3600.0
#: Least gap between two leukocytes, µm.
GAP_UM = 1.0
#: File suffixes :func:`write_smear` writes.
SMEAR_SUFFIXES = (".png", ".tif", ".tiff")


def _leukocyte_classes(n_leukocytes, width: int, height: int, um_per_px: float, classes, rng) -> list[str]:
    if n_leukocytes is None:
        area = width * height * um_per_px ** 2
        n_leukocytes = int(round(area / UM2_PER_LEUKOCYTE))
    if isinstance(n_leukocytes, (int, np.integer)) and not isinstance(n_leukocytes, bool):
        if n_leukocytes < 0:
            raise ValueError(f"n_leukocytes must be >= 0, got {n_leukocytes}")
        classes = [taxonomy.check_class(c) for c in classes]
        if not classes:
            raise ValueError("classes is empty: give at least one class to draw leukocytes from")
        return [str(c) for c in rng.choice(classes, int(n_leukocytes))]
    if isinstance(n_leukocytes, str):
        raise ValueError(f"n_leukocytes must be a count or a list of classes, got the string {n_leukocytes!r}")
    return [taxonomy.check_class(c) for c in n_leukocytes]


def make_smear(width: int = 2000, height: int = 2000, n_leukocytes: int | Sequence[str] | None = None,
               seed: int = 0, um_per_px: float = LMU_UM_PER_PX,
               classes: Sequence[str] = taxonomy.CLASSES) -> tuple[np.ndarray, pd.DataFrame]:
    """A synthetic smear field and its ground truth.

    ``n_leukocytes``: how many leukocytes (classes drawn uniformly from ``classes``), a
    list of their classes, or None for one per :data:`UM2_PER_LEUKOCYTE` µm² of field.
    Returns ``(image, truth)``: ``image`` is ``(height, width, 3)`` uint8 RGB; ``truth``
    has one row per leukocyte, ``x0, y0, x1, y1`` (its bounding box in px, x1/y1
    exclusive, always inside the image) and ``cls``. Raises ``ValueError`` when the
    leukocytes do not fit into the field without overlapping.
    """
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or int(v) != v or v < 8:
            raise ValueError(f"{name} must be an integer of at least 8 px, got {v!r}")
    width, height = int(width), int(height)
    if not (um_per_px > 0 and math.isfinite(um_per_px)):
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ss = np.random.SeedSequence([int(seed), 0x5A3EA])
    look_ss, layout_ss, bg_ss, cells_ss = ss.spawn(4)
    layout = np.random.default_rng(layout_ss)
    look = sample_look(np.random.default_rng(look_ss), um_per_px)
    wanted = _leukocyte_classes(n_leukocytes, width, height, um_per_px, classes, layout)
    cells = []
    for cls, cs in zip(wanted, cells_ss.spawn(len(wanted))):
        p, t = (np.random.default_rng(s) for s in cs.spawn(2))
        cells.append(draw_leukocyte(cls, p, t, um_per_px, look.focus_px))
    placed = _place(cells, width, height, GAP_UM / um_per_px, layout)
    image = render_field(height, width, look, placed, np.random.default_rng(bg_ss))
    rows = [(*cell.bbox(cy, cx), cell.cls) for cell, cy, cx in placed]
    truth = pd.DataFrame(rows, columns=["x0", "y0", "x1", "y1", "cls"])
    truth[["x0", "y0", "x1", "y1"]] = truth[["x0", "y0", "x1", "y1"]].astype(int)
    return image, truth


def _place(cells, width: int, height: int, gap: float, rng: np.random.Generator, tries: int = 500):
    """Centres for the leukocytes, largest first: inside the field, not overlapping."""
    order = sorted(range(len(cells)), key=lambda i: -cells[i].radius)
    taken: list[tuple[float, float, float]] = []
    out = [None] * len(cells)
    for i in order:
        cell = cells[i]
        m = cell.radius + 1
        if 2 * m > min(width, height):
            raise ValueError(f"a {cell.cls} leukocyte ({2 * cell.radius:.0f} px across) does not fit into a "
                             f"{width}x{height} field; use a larger field or a coarser um_per_px")
        for _ in range(tries):
            cy, cx = rng.uniform(m, height - m), rng.uniform(m, width - m)
            if all((cy - y) ** 2 + (cx - x) ** 2 >= (r + cell.radius + gap) ** 2 for y, x, r in taken):
                break
        else:
            raise ValueError(f"cannot place {len(cells)} leukocytes without overlap in a {width}x{height} field; "
                             "use a larger field or fewer leukocytes")
        taken.append((cy, cx, cell.radius))
        out[i] = (cell, int(cy), int(cx))
    return out


def write_smear(path: str | os.PathLike, width: int = 2000, height: int = 2000,
                n_leukocytes: int | Sequence[str] | None = None, seed: int = 0,
                um_per_px: float = LMU_UM_PER_PX, classes: Sequence[str] = taxonomy.CLASSES) -> tuple[Path, Path]:
    """Write a synthetic smear to ``path`` (.png, .tif or .tiff) and its truth to ``<stem>_truth.csv``.

    A TIFF records its scale as resolution in pixels per centimetre (``1e4 / um_per_px``),
    a PNG as dots per inch, so readers can recover µm/px. Returns ``(image_path, truth_path)``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SMEAR_SUFFIXES:
        raise ValueError(f"{path}: unsupported smear image type {path.suffix!r}; use one of {', '.join(SMEAR_SUFFIXES)}")
    image, truth = make_smear(width, height, n_leukocytes, seed, um_per_px, classes)
    with atomic_path(path) as tmp:
        if suffix == ".png":
            dpi = 25400.0 / um_per_px
            Image.fromarray(image).save(tmp, format="PNG", dpi=(dpi, dpi), compress_level=1)
        else:
            res = 1e4 / um_per_px
            tifffile.imwrite(tmp, image, photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER")
    truth_path = path.with_name(f"{path.stem}_truth.csv")
    atomic_write_csv(truth, truth_path)
    return path, truth_path
