"""Crops that leave the field: padded with the field's background, never mirrored; a cell whose model
input is mostly padding is referred; native-resolution crops for people, used by the review importer."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukoscope import taxonomy
from leukoscope.imaging.images import load_rgb
from leukoscope.review.importer import build_database
from leukoscope.screen.crops import (MAX_PADDING_FRACTION, background_colour, cell_crop, native_square,
                                     padding_fraction)
from leukoscope.screen.engine import REFER_OUTSIDE, ScreenEngine
from leukoscope.synth import make_smear

BG = (231, 224, 219)


class RecordingBundle:
    """Bundle test double that keeps every model input and calls each cell MYO at 0.9."""

    def __init__(self, input_size=64):
        self.meta = {"classes": list(taxonomy.CLASSES), "input_size": input_size, "um_per_px": 29.0 / input_size,
                     "temperature": 1.0, "model": "recording"}
        self.classes = taxonomy.CLASSES
        self.inputs = []

    def predict_proba_prepared(self, images, batch_size=64, calibrated=True):
        self.inputs.extend(np.asarray(images))
        out = np.full((len(images), len(self.classes)), 0.1 / (len(self.classes) - 1))
        out[:, taxonomy.class_index("MYO")] = 0.9
        return out


def _edge_field() -> np.ndarray:
    """Background with a dark violet 'nucleus' touching the left edge and a red stripe near the top edge."""
    img = np.empty((300, 400, 3), np.uint8)
    img[:] = BG
    yy, xx = np.mgrid[:300, :400]
    img[(yy - 150) ** 2 + (xx - 10) ** 2 < 40 ** 2] = (90, 60, 150)
    img[5:25, 100:300] = (200, 120, 120)
    # bright background dominates: the background colour is BG
    return img


def test_crop_at_the_border_is_padded_with_background_not_mirrored():
    img = _edge_field()
    crop = cell_crop(img, 10, 150, 160)   # 70 of its 160 columns lie left of the field
    left = crop[:, :70]                   # x < 0 in the field: padding only
    assert (left == np.array(BG, np.uint8)).all(), "the padding repeats the field (mirrored), not its background"
    assert (crop[:, 70:] == img[70:230, 0:90]).all()   # the inside is the field itself
    top = cell_crop(img, 200, 10, 100)    # y < 0: the red stripe must not reappear above the edge
    assert (top[:40] == np.array(BG, np.uint8)).all()
    assert background_colour(img).tolist() == list(BG)
    assert padding_fraction(300, 400, 10, 150, 160) == pytest.approx(70 / 160)


def test_native_square_covers_the_box_with_margin_and_minimum():
    cx, cy, side = native_square(100, 100, 180, 140, um_per_px=0.1)
    assert (cx, cy) == (140, 120) and side == 300           # 30 µm at 0.1 µm/px beats 80 * 1.5 + 8
    assert native_square(100, 100, 180, 140)[2] == 128       # no scale: the box plus margin


def test_tiny_field_cell_is_referred_as_mostly_outside_and_its_input_shows_no_mirror(tmp_path):
    """A 200 px field at 0.1 µm/px is 20 µm: the model's 29 µm view is more than half outside it.
    The old code reflected the field into that half (a 'kaleidoscope') and classified it at 0.9."""
    img, truth = make_smear(200, 200, n_leukocytes=1, seed=4, um_per_px=0.1)
    bundle = RecordingBundle()
    res = ScreenEngine(bundle, um_per_px=0.1, progress=False).screen([img], names=["tiny"])
    assert len(res.cells) == 1 and len(bundle.inputs) == 1
    x = bundle.inputs[0].astype(int)
    bg = background_colour(img).astype(int)
    # the 290 px view around a 200 px field: ~45 px of padding each side, ~10 px at the 64 px input
    for band in (x[:8], x[-8:], x[:, :8], x[:, -8:]):
        assert np.abs(band - bg).max() <= 3, "the padded border is not the field's background"
    cell = res.cells.iloc[0]
    assert cell.pad_frac > MAX_PADDING_FRACTION
    assert cell.referred and cell.pred == "unidentified" and cell.refer_reason == REFER_OUTSIDE


def test_native_crops_are_written_per_cell_and_the_importer_uses_them(tmp_path):
    from leukoscope.synth import write_smear

    path, truth = write_smear(tmp_path / "field.tif", 900, 700, n_leukocytes=3, seed=7, um_per_px=0.1)
    out = tmp_path / "run"
    res = ScreenEngine(RecordingBundle(32), progress=False).screen([path], out_dir=out)
    res.write(out, review=False)
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == len(pd.read_csv(truth)) and cells["crop_native"].notna().all()
    field = load_rgb(path)
    for _, r in cells.iterrows():
        crop = load_rgb(out / r.crop_native)
        cx, cy, side = native_square(r.x0, r.y0, r.x1, r.y1, 0.1)
        assert crop.shape == (side, side, 3)
        ox, oy = int(round(cx - side / 2)), int(round(cy - side / 2))
        inside = field[max(0, oy):oy + side, max(0, ox):ox + side]
        assert (crop[max(0, -oy):max(0, -oy) + inside.shape[0], max(0, -ox):max(0, -ox) + inside.shape[1]]
                == inside).all()   # the field's own pixels at native resolution
    # the review importer takes the stored crop (marked here) instead of cutting it again
    marked = out / cells.crop_native[0]
    side = load_rgb(marked).shape[0]
    Image.fromarray(np.full((side, side, 3), (0, 255, 0), np.uint8)).save(marked)
    db = build_database(out, tmp_path / "review.sqlite")
    with sqlite3.connect(db) as con:
        blobs = [b for (b,) in con.execute("SELECT crop FROM cells ORDER BY y0, x0")]
    import io

    first = np.asarray(Image.open(io.BytesIO(blobs[0])).convert("RGB"))
    assert (first == (0, 255, 0)).all()
