"""Red-cell ruler: real LMU crops resized by known factors, and synthetic fields of known red-cell size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from leukoscope.imaging.images import load_rgb
from leukoscope.imaging.scale import LMU_UM_PER_PX, rescale
from leukoscope.imaging.scale_estimate import (RBC_DIAMETER_UM, estimate_dataset_scale, estimate_scale,
                                       estimate_um_per_px, resolve_um_per_px)

FACTORS = (0.5, 0.75, 1.0, 1.5)
#: LMU crops whose field shows at least three whole red cells away from the leukocyte.
WELL_FILLED = ("LYT/LYT_1802.tiff", "LYT/LYT_2109.tiff", "MMZ/MMZ_0003.tiff", "NGS/NGS_0957.tiff",
               "NGS/NGS_4852.tiff", "MYO/MYO_2360.tiff", "MYO/MYO_3036.tiff", "PMB/PMB_0013.tiff")


def field(diameter_px: float, size: int = 300, seed: int = 0, nucleus: bool = True) -> np.ndarray:
    """Light background, pink red cells with pale centres (some touching), a leukocyte in the middle."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float64)
    img[:] = (236, 228, 222)
    yy, xx = np.mgrid[:size, :size]
    r = diameter_px / 2
    c = size / 2
    centres = []
    for _ in range(400):
        y, x = rng.uniform(-0.3 * r, size + 0.3 * r, 2)
        if (y - c) ** 2 + (x - c) ** 2 < (0.22 * size + r) ** 2:
            continue
        if all((y - a) ** 2 + (x - b) ** 2 >= (1.9 * r) ** 2 for a, b in centres):
            centres.append((y, x))
    for y, x in centres:
        rr = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
        disc = rr <= r * rng.uniform(0.97, 1.03)
        img[disc] = (205, 140, 150)
        img[rr <= 0.35 * r] = (225, 190, 195)   # central pallor
    if nucleus:
        rr = np.sqrt((yy - c) ** 2 + (xx - c) ** 2)
        img[rr <= 0.2 * size] = (215, 195, 225)  # cytoplasm
        img[rr <= 0.13 * size] = (95, 45, 140)   # nucleus
    img += rng.normal(0, 2.0, img.shape)
    return img.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("d", [24, 40, 70])
def test_synthetic_field_of_known_red_cell_diameter(d):
    est = estimate_scale(field(d, size=int(7.5 * d)))
    assert est.plausible, est.reason
    assert est.n_rbc >= 3
    assert est.diameter_px == pytest.approx(d, rel=0.1)
    assert est.um_per_px == pytest.approx(RBC_DIAMETER_UM / d, rel=0.1)


def test_no_red_cells_is_reported_not_guessed():
    blank = np.full((200, 200, 3), 230, np.uint8)
    est = estimate_scale(blank)
    assert not est.plausible and est.n_rbc == 0 and np.isnan(est.um_per_px)
    only_wbc = field(30, size=200)
    only_wbc[:] = only_wbc[100, 100]
    assert not estimate_scale(only_wbc).plausible


def test_lmu_crops_resized_by_known_factors_come_back_to_29_um_per_400_px(lmu_sample):
    imgs = [load_rgb(lmu_sample / p) for p in WELL_FILLED]
    for f in FACTORS:
        ratios = []
        for img in imgs:
            um = estimate_um_per_px(rescale(img, f))
            ratios.append(um / (LMU_UM_PER_PX / f))
        ratios = np.array(ratios)
        # every crop within 15%, the crops' median within 10%
        assert np.all(np.abs(ratios - 1) < 0.15), (f, ratios.round(3))
        assert abs(np.median(ratios) - 1) < 0.10, (f, ratios.round(3))


def test_pooled_estimate_over_the_whole_lmu_sample_is_within_10_percent(lmu_sample):
    paths = sorted(lmu_sample.glob("*/*.tiff"))
    imgs = [load_rgb(p) for p in paths[::2]]
    for f in (0.5, 1.0, 1.5):
        est = estimate_dataset_scale([rescale(i, f) for i in imgs])
        assert est.plausible and est.n_rbc >= 20
        assert est.um_per_px == pytest.approx(LMU_UM_PER_PX / f, rel=0.1), f


def test_resolve_prefers_user_then_table_then_estimate_and_warns_on_failure(tmp_path):
    from PIL import Image

    good, blank = tmp_path / "g.png", tmp_path / "b.png"
    Image.fromarray(field(30, size=240)).save(good)
    Image.fromarray(np.full((64, 64, 3), 230, np.uint8)).save(blank)
    t = pd.DataFrame({"path": [str(good), str(good), str(blank)], "label": ["NGS"] * 3,
                      "source": ["a", "b", "c"], "um_per_px": [0.1, np.nan, np.nan]})
    r = resolve_um_per_px(t, user_um_per_px=0.2)
    assert (r.um_per_px == 0.2).all() and set(r.origin) == {"user"}
    with pytest.warns(RuntimeWarning, match="'c'"):
        r = resolve_um_per_px(t)
    assert r.um_per_px[0] == 0.1 and r.origin[0] == "table"
    assert r.origin[1] == "estimated" and r.um_per_px[1] == pytest.approx(7.5 / 30, rel=0.1)
    assert r.origin[2] == "unknown" and np.isnan(r.um_per_px[2])
    assert r.estimates["b"]["n_rbc"] >= 3
    with pytest.warns(RuntimeWarning):
        r = resolve_um_per_px(t, fallback=0.1)
    assert r.um_per_px[2] == 0.1 and r.origin[2] == "fallback"
    r = resolve_um_per_px(t, estimate="off")
    assert np.isnan(r.um_per_px[1:]).all()
