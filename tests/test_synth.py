"""Synthetic cells and smears: determinism, layout, ground truth, class cues, scale.

Everything is drawn small (48-160 px, few cells) so the file runs in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.measure import label, regionprops

from leukoscope import taxonomy
from leukoscope.synth import make_cell, make_smear, simulate_examiners, write_cells, write_smear
from leukoscope.synth.cells import CONFUSABLE, draw_leukocyte

LMU = 29.0 / 400


def nucleus_mask(img: np.ndarray, green_below: int = 90) -> np.ndarray:
    """Deep-purple (nucleus-like) pixels: little green, blue above red."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (g < green_below) & (b > r)


# ------------------------------------------------------------------ single cells

def test_same_seed_same_pixels_other_seed_other_pixels():
    a = make_cell("MYO", seed=7, size=64)
    assert a.tobytes() == make_cell("MYO", seed=7, size=64).tobytes()
    assert a.tobytes() != make_cell("MYO", seed=8, size=64).tobytes()
    assert a.tobytes() != make_cell("MOB", seed=7, size=64).tobytes()


@pytest.mark.parametrize("cls", taxonomy.CLASSES)
def test_every_class_is_drawn_as_an_rgb_cell_with_a_leukocyte_in_the_middle(cls):
    img = make_cell(cls, seed=1, size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # the background is light, and the centre holds stained cell material darker than red cells
    assert np.median(img.sum(axis=2)) > 550
    centre = img[24:40, 24:40].astype(int)
    assert centre[..., 1].min() < 140, f"{cls}: no stained leukocyte at the centre"


def test_unknown_class_or_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'XYZ'.*BAS, EBO"):
        make_cell("XYZ", seed=0, size=64)
    with pytest.raises(ValueError, match="'XYZ'"):
        write_cells(tmp_path, per_class=1, size=48, classes=["NGS", "XYZ"])
    with pytest.raises(ValueError, match="'XYZ'"):
        make_smear(200, 200, n_leukocytes=["XYZ"])
    with pytest.raises(ValueError, match="seed"):
        make_cell("NGS", seed=-1, size=64)
    with pytest.raises(ValueError, match="size"):
        make_cell("NGS", seed=0, size=8)


def _largest_dark_region(img):
    regions = regionprops(label(nucleus_mask(img)))
    return max(regions, key=lambda r: r.area) if regions else None


def test_a_cell_drawn_at_half_the_um_per_px_is_twice_as_big():
    # same (class, seed): same cell geometry, drawn at 0.2 and at 0.1 µm/px
    for seed in (0, 1, 2):
        coarse = _largest_dark_region(make_cell("LYT", seed, size=128, um_per_px=0.2))
        fine = _largest_dark_region(make_cell("LYT", seed, size=128, um_per_px=0.1))
        ratio = fine.equivalent_diameter_area / coarse.equivalent_diameter_area
        assert 1.8 < ratio < 2.2, ratio


def test_default_scale_is_lmu_at_400px_and_the_crop_spans_29um_at_any_size():
    big = _largest_dark_region(make_cell("EBO", 3, size=192))
    small = _largest_dark_region(make_cell("EBO", 3, size=96))
    assert 1.8 < big.equivalent_diameter_area / small.equivalent_diameter_area < 2.2
    # a segmented neutrophil is 12.5-15.5 µm: at the LMU scale that is ~170-215 px of 400
    cell = draw_leukocyte("NGS", np.random.default_rng(0), np.random.default_rng(0), LMU)
    ys, xs = np.nonzero(cell.mask > 0.5)
    assert 160 < xs.max() - xs.min() < 230


def test_erythroblast_nucleus_is_smaller_and_darker_than_myeloblast():
    ebo = [make_cell("EBO", s, size=96) for s in range(6)]
    myo = [make_cell("MYO", s, size=96) for s in range(6)]
    area = lambda imgs: np.mean([nucleus_mask(i).sum() for i in imgs])  # noqa: E731
    red = lambda imgs: np.mean([i[..., 0][nucleus_mask(i)].mean() for i in imgs])  # noqa: E731
    assert area(ebo) < 0.5 * area(myo)
    assert red(ebo) < red(myo) - 30  # denser chromatin absorbs more red


def test_eosinophil_has_orange_red_granules_and_neutrophil_has_none():
    def orange(img):
        r, g, b = (img[..., i].astype(int) for i in range(3))
        return ((r - g > 45) & (r - b > 30)).mean()

    eos = np.mean([orange(make_cell("EOS", s, size=96)) for s in range(4)])
    ngs = np.mean([orange(make_cell("NGS", s, size=96)) for s in range(4)])
    assert eos > 0.03 and eos > 20 * ngs


def test_basophil_granules_darken_the_cytoplasm_more_than_neutrophil_dust():
    def dark_in_cell(cls, s):
        cell = draw_leukocyte(cls, np.random.default_rng(s), np.random.default_rng(s + 1), 0.15)
        cyto = (cell.mask > 0.9) & (cell.nucleus < 0.1)
        return (cell.od[..., 1][cyto] > 1.0).mean()

    bas = np.mean([dark_in_cell("BAS", s) for s in range(5)])
    ngs = np.mean([dark_in_cell("NGS", s) for s in range(5)])
    assert bas > 0.05 and bas > 10 * ngs


def _falls_apart(nucleus: np.ndarray) -> bool:
    """True when eroding the nucleus by 45% of its half-width splits it (thin strands)."""
    m = nucleus > 0.5
    dt = ndimage.distance_transform_edt(m)
    return ndimage.label(dt > 0.45 * dt.max())[1] > 1


def _nuclei(cls, n=24):
    return [draw_leukocyte(cls, np.random.default_rng(s), np.random.default_rng(s), 0.15).nucleus
            for s in range(n)]


def test_segmented_neutrophils_have_strands_bands_mostly_do_not_but_overlap():
    ngs = np.mean([_falls_apart(m) for m in _nuclei("NGS")])
    ngb = np.mean([_falls_apart(m) for m in _nuclei("NGB")])
    assert ngs > 0.8
    assert 0.0 < ngb < 0.4  # hard pair: some bands are pinched like segments


def test_metamyelocyte_nucleus_is_more_indented_than_myelocyte():
    solidity = lambda cls: np.mean([regionprops(label(m > 0.5))[0].solidity for m in _nuclei(cls)])  # noqa: E731
    assert solidity("MMZ") < solidity("MYB") - 0.03
    assert solidity("MYB") < solidity("MYO") + 0.01


def test_the_same_seed_gives_the_same_cell_geometry_at_every_size():
    a = draw_leukocyte("MON", np.random.default_rng(5), np.random.default_rng(9), 0.2)
    b = draw_leukocyte("MON", np.random.default_rng(5), np.random.default_rng(9), 0.1)
    assert abs(b.radius / a.radius - 2.0) < 1e-6


# ------------------------------------------------------------------ dataset writer

def test_write_cells_makes_an_lmu_layout_readable_by_the_readers(tmp_path):
    from leukoscope.data import read_dataset
    from leukoscope.data.readers import read_annotations
    from leukoscope.imaging.images import load_rgb

    out = write_cells(tmp_path / "ds", per_class=2, seed=3, size=48, reannotate_fraction=0.5)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tiff"))
    assert len(files) == 30
    ann = read_annotations(out / "annotations.dat")
    assert sorted(ann["path"]) == files
    assert (ann["gold"] == ann["path"].str.split("/").str[0]).all()
    assert ann["path"].str.fullmatch(r"([A-Z]{3})/\1_\d{4}\.tiff").all()
    assert set(ann["gold"]) == set(taxonomy.CLASSES)
    # re-annotated rows have both examiners, the others neither (as in the LMU file)
    both = (ann["reannotation1"] != "nan") == (ann["reannotation2"] != "nan")
    assert both.all() and (ann["reannotation1"] != "nan").any()
    img = load_rgb(out / files[0])
    assert img.shape == (48, 48, 3)
    ds = read_dataset(out)
    assert len(ds.table) == 30 and not ds.skipped
    # the same seed writes the same pixels
    again = write_cells(tmp_path / "again", per_class=1, seed=3, size=48, classes=["KSC"])
    assert (load_rgb(again / "KSC/KSC_0001.tiff") == load_rgb(out / "KSC/KSC_0001.tiff")).all()


def test_write_cells_only_requested_classes(tmp_path):
    out = write_cells(tmp_path, per_class=1, size=48, classes=["NGS", "MYO"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["MYO", "NGS"]
    lines = (out / "annotations.dat").read_text().splitlines()
    assert lines == ["MYO/MYO_0001.tiff MYO nan nan", "NGS/NGS_0001.tiff NGS nan nan"]


def test_simulated_examiners_mostly_agree_and_confuse_the_hard_pairs():
    gold = list(taxonomy.CLASSES) * 200
    re = simulate_examiners(gold, 1.0, np.random.default_rng(0))
    first = np.array([r[0] for r in re])
    gold = np.array(gold)
    agree = (first == gold).mean()
    assert 0.8 < agree < 0.92
    assert 0.01 < (first == taxonomy.UNCERTAIN).mean() < 0.06
    wrong = [(g, f) for g, f in zip(gold, first) if f != g and f != taxonomy.UNCERTAIN]
    confusable = np.mean([f in CONFUSABLE[g] for g, f in wrong])
    assert confusable > 0.7
    none = simulate_examiners(gold[:50], 0.0, np.random.default_rng(0))
    assert all(r == ("nan", "nan") for r in none)
    with pytest.raises(ValueError, match="between 0 and 1"):
        simulate_examiners(gold[:5], 1.5, np.random.default_rng(0))


# ------------------------------------------------------------------ smears

SMEAR_CLASSES = ["MYO", "NGS", "EBO", "LYT", "EOS"]


@pytest.fixture(scope="module")
def smear():
    return make_smear(900, 700, n_leukocytes=SMEAR_CLASSES, seed=4, um_per_px=0.15)


def test_smear_truth_lists_the_requested_leukocytes_inside_the_image(smear):
    img, truth = smear
    assert img.shape == (700, 900, 3) and img.dtype == np.uint8
    assert list(truth.columns) == ["x0", "y0", "x1", "y1", "cls"]
    assert sorted(truth["cls"]) == sorted(SMEAR_CLASSES)
    assert (truth["x0"] >= 0).all() and (truth["y0"] >= 0).all()
    assert (truth["x1"] <= 900).all() and (truth["y1"] <= 700).all()
    assert ((truth["x1"] > truth["x0"]) & (truth["y1"] > truth["y0"])).all()


def test_smear_leukocytes_are_where_the_truth_says_and_nowhere_else(smear):
    img, truth = smear
    nuc = nucleus_mask(img, green_below=70)
    inside = np.zeros(nuc.shape, bool)
    for row in truth.itertuples():
        box = nuc[row.y0:row.y1, row.x0:row.x1]
        assert box.mean() > 0.05, f"no nucleus in the {row.cls} box"
        inside[max(row.y0 - 3, 0):row.y1 + 3, max(row.x0 - 3, 0):row.x1 + 3] = True
    # dark-purple blobs bigger than a platelet lie only in the boxes
    lab, n = ndimage.label(nuc)
    sizes = np.bincount(lab.ravel())
    big = np.isin(lab, np.nonzero(sizes > (2.0 / 0.15) ** 2)[0][1:])
    assert big.any() and not (big & ~inside).any()
    # leukocytes do not overlap one another
    boxes = truth[["x0", "y0", "x1", "y1"]].to_numpy()
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            overlap_x = min(a[2], b[2]) - max(a[0], b[0])
            overlap_y = min(a[3], b[3]) - max(a[1], b[1])
            # boxes of round cells may touch at corners, cells may not: allow a small corner overlap
            assert overlap_x <= 0 or overlap_y <= 0 or overlap_x * overlap_y < 0.15 * min(
                (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def test_smear_has_red_cells_of_the_right_size():
    from skimage.segmentation import clear_border

    diam = []
    for seed in (0, 2):
        img, truth = make_smear(400, 400, n_leukocytes=0, seed=seed, um_per_px=0.1)
        assert truth.empty
        rbc = ndimage.binary_fill_holes(ndimage.binary_opening(img[..., 1] < 215, iterations=2))
        lab = clear_border(ndimage.label(rbc)[0])  # whole red cells and clusters of touching ones
        diam += [r.equivalent_diameter_area * 0.1 for r in regionprops(lab)]
    # isolated red cells measure ~7.5 µm; clusters are larger, nothing whole is much smaller
    assert sum(6.0 < d < 9.0 for d in diam) >= 5
    assert sum(d < 5.0 for d in diam) <= 1


def test_smear_scale_and_determinism():
    a, ta = make_smear(300, 300, n_leukocytes=["LYT"], seed=2, um_per_px=0.2)
    b, tb = make_smear(600, 600, n_leukocytes=["LYT"], seed=2, um_per_px=0.1)
    wa, wb = (t.iloc[0]["x1"] - t.iloc[0]["x0"] for t in (ta, tb))
    assert 1.85 < wb / wa < 2.15
    a2, ta2 = make_smear(300, 300, n_leukocytes=["LYT"], seed=2, um_per_px=0.2)
    assert a.tobytes() == a2.tobytes() and ta.equals(ta2)
    assert a.tobytes() != make_smear(300, 300, n_leukocytes=["LYT"], seed=3, um_per_px=0.2)[0].tobytes()


def test_smear_default_count_and_errors():
    _, truth = make_smear(600, 600, seed=0, um_per_px=0.2)  # 120 x 120 µm -> 4 leukocytes
    assert len(truth) == 4
    _, truth = make_smear(500, 500, n_leukocytes=3, seed=0, um_per_px=0.2, classes=["MON"])
    assert list(truth["cls"]) == ["MON"] * 3
    with pytest.raises(ValueError, match="without overlap"):
        make_smear(300, 300, n_leukocytes=40, seed=0, um_per_px=0.2)
    with pytest.raises(ValueError, match="does not fit"):
        make_smear(100, 100, n_leukocytes=["MOB"], seed=0)


def test_write_smear_records_scale_and_truth(tmp_path):
    import tifffile

    path, truth_path = write_smear(tmp_path / "field.tiff", 320, 240, n_leukocytes=["NGS"], seed=5, um_per_px=0.2)
    assert truth_path == tmp_path / "field_truth.csv"
    truth = pd.read_csv(truth_path)
    img, expected = make_smear(320, 240, n_leukocytes=["NGS"], seed=5, um_per_px=0.2)
    pd.testing.assert_frame_equal(truth, expected)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert (page.asarray() == img).all()
        num, den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        assert abs(1e4 / (num / den) - 0.2) < 1e-4
    png, _ = write_smear(tmp_path / "field.png", 160, 120, n_leukocytes=0, seed=5)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (160, 120)
    with pytest.raises(ValueError, match="unsupported"):
        write_smear(tmp_path / "field.jpg", 160, 120)


# ------------------------------------------------------------------ command line

def test_cli_writes_cells_and_smear(tmp_path, capsys):
    from leukoscope.cli.main import main

    rc = main(["synth", "cells", "--per-class", "1", "--out", str(tmp_path / "c"), "--size", "48",
               "--classes", "NGS", "EBO"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "c").rglob("*.tiff")) == ["EBO_0001.tiff", "NGS_0001.tiff"]
    rc = main(["synth", "smear", "--out", str(tmp_path / "s.png"), "--width", "300", "--height", "200",
               "--leukocytes", "1", "--um-per-px", "0.25"])
    assert rc == 0
    assert (tmp_path / "s.png").exists() and len(pd.read_csv(tmp_path / "s_truth.csv")) == 1
    rc = main(["synth", "cells", "--per-class", "1", "--out", str(tmp_path / "x"), "--classes", "FOO"])
    assert rc == 2
    assert "'FOO'" in capsys.readouterr().err
