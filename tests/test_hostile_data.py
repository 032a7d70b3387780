"""Hostile data (issue 17 items 2, 4, 5, 6): duplicate annotation lines, invalid µm/px from every entry
point, a single path given as a string, 12-bit data in 16-bit TIFFs and floating-point TIFFs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from leukoscope.cli.main import main
from leukoscope.data import read_dataset
from leukoscope.data.readers import DataError, as_path_list, check_images, iter_image_paths, read_annotations
from leukoscope.evaluate.agreement import agreement, agreement_from_annotations
from leukoscope.evaluate.external import evaluate_sets
from leukoscope.imaging.images import ImageError, load_rgb
from leukoscope.imaging.scale_policy import ScalePolicy, check_um_per_px, check_um_per_px_column
from leukoscope.predict import predict_paths
from leukoscope.train import TrainConfig
from leukoscope.train.adapt import adapt

BAD_UM = [0, -1, float("nan"), float("inf"), 1e-9, "abc"]


def _png(path: Path, colour=(200, 150, 180)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path)
    return path


# --------------------------------------------------------------------------- item 2: duplicate lines


def _lmu(root: Path, lines: str) -> Path:
    _png(root / "MYO" / "MYO_0001.png")
    _png(root / "MYO" / "MYO_0002.png")
    _png(root / "NGS" / "NGS_0001.png")
    (root / "annotations.dat").write_text(lines)
    return root


def test_annotations_listing_an_image_twice_with_different_labels_are_refused_with_line_numbers(tmp_path):
    root = _lmu(tmp_path, "MYO/MYO_0001.png MYO nan nan\nNGS/NGS_0001.png NGS nan nan\n"
                          "MYO/MYO_0002.png MYO nan nan\n./MYO/MYO_0001.png NGS nan nan\n")
    with pytest.raises(DataError, match=r"listed more than once with different labels: MYO/MYO_0001.png on lines "
                                        r"1 \(MYO nan nan\), 4 \(NGS nan nan\)"):
        read_dataset(root)
    with pytest.raises(ValueError, match="lines 1 .*, 4 "):
        agreement_from_annotations(root / "annotations.dat")


def test_identical_duplicate_lines_are_used_once_with_a_warning_and_a_note(tmp_path):
    root = _lmu(tmp_path, "MYO/MYO_0001.png NGS MYO UNC\nNGS/NGS_0001.png NGS NGS nan\n"
                          "MYO/MYO_0002.png MYO MYO nan\nMYO/MYO_0001.png NGS MYO UNC\n")
    with pytest.warns(RuntimeWarning, match=r"MYO/MYO_0001.png on lines \[1, 4\]; each is used once"):
        ds = read_dataset(root)
    assert len(ds) == 3 and ds.table["path"].is_unique
    assert ds.extra["annotations"]["n_listed"] == 3
    # the folder/annotation note is now true: the annotation (NGS) is the one label used, once
    assert ds.table.loc[ds.table["path"].str.endswith("MYO_0001.png"), "label"].tolist() == ["NGS"]
    assert sum("folder says MYO, annotations.dat says NGS; the annotation is used" in n for n in ds.notes) == 1
    assert any("listed 2 times in annotations.dat (lines 1, 4)" in n for n in ds.notes)
    with pytest.warns(RuntimeWarning):
        res = agreement_from_annotations(root / "annotations.dat")
    assert res["reannotation1"]["n"] == 3 and res["reannotation2"]["n"] == 1  # the image counted once


def test_agreement_refuses_a_table_that_lists_an_image_twice():
    df = pd.DataFrame({"path": ["a.png", "b.png", "a.png"], "gold": ["MYO", "NGS", "MYO"],
                       "reannotation1": ["MYO", "NGS", "MYO"], "reannotation2": ["nan"] * 3})
    with pytest.raises(ValueError, match="listed more than once, e.g. a.png"):
        agreement(df)
    assert agreement(df.iloc[:2])["reannotation1"]["n"] == 2


def test_manifest_listing_a_path_twice(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    m = tmp_path / "labels.csv"
    m.write_text("path,label\nimg/a.png,MYO\nimg/b.png,NGS\n./img/a.png,NGS\n")
    with pytest.raises(DataError, match=r"with different entries: .*a.png on lines 2 \(MYO\), 4 \(NGS\)"):
        read_dataset(m)
    m.write_text("path,label\nimg/a.png,MYO\nimg/b.png,NGS\nimg/a.png,MYO\n")
    with pytest.warns(RuntimeWarning, match=r"on lines \[2, 4\]; each is used once"):
        ds = read_dataset(m)
    assert len(ds) == 2 and ds.extra["duplicates"][0]["lines"] == [2, 4]


# --------------------------------------------------------------------------- item 4: one µm/px validator


@pytest.mark.parametrize("bad", BAD_UM)
def test_one_validator_refuses_implausible_scales_naming_the_origin_and_the_range(bad):
    with pytest.raises(ValueError, match=r"--um-per-px .*0\.02-1 µm/px"):
        check_um_per_px(bad, "--um-per-px")
    with pytest.raises(ValueError, match=r"predict_paths\(um_per_px=\.\.\.\)"):
        predict_paths(None, ["x.png"], um_per_px=bad)
    with pytest.raises(ValueError, match=r"evaluate_sets\(um_per_px=\.\.\.\)"):
        evaluate_sets(None, pd.DataFrame({"path": ["x.png"], "label": ["MYO"]}), um_per_px=bad)
    with pytest.raises(ValueError, match=r"adapt\(um_per_px=\.\.\.\)"):
        adapt("no-model.safetensors", pd.DataFrame({"path": ["x.png"], "label": ["MYO"]}), "out", um_per_px=bad)
    with pytest.raises(ValueError, match="given um_per_px"):
        ScalePolicy(given=bad).resolve(pd.DataFrame({"path": ["x.png"]}))
    assert check_um_per_px("0.1", "x") == 0.1


@pytest.mark.parametrize("bad", ["-1", "abc", "0", "inf", "1e-9"])
def test_labels_csv_um_per_px_is_checked_row_by_row(tmp_path, bad):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text(f"path,label,um_per_px\na.png,MYO,0.1\nb.png,NGS,{bad}\n")
    with pytest.raises(DataError, match=r"labels.csv line 3: um_per_px .*(plausible|range)"):
        read_dataset(tmp_path)
    (tmp_path / "labels.csv").write_text("path,label,um_per_px\na.png,MYO,0.1\nb.png,NGS,\n")
    um = read_dataset(tmp_path).table["um_per_px"].tolist()
    assert um[0] == 0.1 and math.isnan(um[1])  # blank = unknown


def test_a_table_with_an_implausible_scale_is_refused_by_the_scale_policy():
    table = pd.DataFrame({"path": ["a.png", "b.png"], "um_per_px": [0.1, -1.0]})
    with pytest.raises(ValueError, match=r"table's um_per_px \(row 1\)"):
        ScalePolicy().resolve(table)
    assert np.isnan(check_um_per_px_column([None, "", np.nan, " "])).all()
    assert check_um_per_px_column(["0.2", 0.05]).tolist() == [0.2, 0.05]


@pytest.mark.parametrize("command", [["predict", "m.safetensors", "x.png", "--out", "p.csv"],
                                     ["evaluate", "m.safetensors", "data"],
                                     ["adapt", "m.safetensors", "lab", "--out", "run"],
                                     ["review", "predictions.csv"]])
@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "1e-9", "abc"])
def test_every_um_per_px_option_is_checked_when_parsed(command, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, f"--um-per-px={bad}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--um-per-px" in err and "0.02-1 µm/px" in err and "Traceback" not in err


# --------------------------------------------------------------------------- item 5: one path as a string


def test_a_single_path_string_is_one_path_and_never_scans_root_or_cwd(tmp_path, monkeypatch):
    img = _png(tmp_path / "cells" / "a.png")
    scanned = []
    real_rglob = Path.rglob

    def spy(self, pattern):
        scanned.append(self.resolve())
        return real_rglob(self, pattern)

    monkeypatch.setattr(Path, "rglob", spy)
    monkeypatch.chdir(tmp_path)
    assert iter_image_paths(str(img)) == [img]
    assert iter_image_paths(img) == [img]
    assert scanned == []
    assert iter_image_paths(str(tmp_path / "cells")) == [img]
    assert scanned == [(tmp_path / "cells").resolve()]
    assert as_path_list(["a.png", Path("b.png")]) == ["a.png", Path("b.png")]
    for bad in ("", ["x.png", ""], b"x.png", 3, [3]):
        with pytest.raises(ValueError, match="empty path|expected"):
            as_path_list(bad)
    with pytest.raises(ValueError, match="empty path"):
        predict_paths(None, "")


# --------------------------------------------------------------------------- item 6: bit depth, floats


def _ramp16(hi: int) -> np.ndarray:
    return np.linspace(0, hi, 40 * 40 * 3).reshape(40, 40, 3).astype(np.uint16)


def test_12_bit_data_in_16_bit_tiff_uses_the_stated_bit_depth(tmp_path):
    data = _ramp16(4095)
    tifffile.imwrite(tmp_path / "bps.tiff", data, bitspersample=12)
    tifffile.imwrite(tmp_path / "maxtag.tiff", data, extratags=[(281, "H", 1, 4095, True)])
    tifffile.imwrite(tmp_path / "smax.tiff", data, extratags=[(341, "H", 1, 4095, True)])
    expected = (data / 4095 * 255 + 0.5).astype(np.uint8)
    for name in ("bps.tiff", "maxtag.tiff", "smax.tiff"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a stated depth: no dark-image warning
            img = load_rgb(tmp_path / name)
        assert img.max() == 255 and np.array_equal(img, expected), name


def test_12_bit_scan_read_tile_by_tile_uses_the_stated_bit_depth(tmp_path, monkeypatch):
    """A whole-slide scan (read by screen through zarr, tile by tile) with 12-bit samples: as the loader."""
    from leukoscope.screen import tiles as tiles_mod

    data = np.linspace(0, 4095, 256 * 256 * 3).reshape(256, 256, 3).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scan.tiff", data, bitspersample=12, tile=(64, 64), photometric="rgb")
    monkeypatch.setattr(tiles_mod, "WHOLE_READ_PIXELS", 1000)  # the tiled reader, not the whole-image one
    smear = tiles_mod.open_smear(tmp_path / "scan.tiff")
    assert smear.tiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stated depth: no dark-image warning
        region = smear.read(0, 0, 256, 256)
    assert np.array_equal(region, (data / 4095 * 255 + 0.5).astype(np.uint8))


def test_16_bit_tiff_without_a_bit_depth_warns_when_it_is_dark(tmp_path):
    tifffile.imwrite(tmp_path / "dark.tiff", _ramp16(4095))
    with pytest.warns(RuntimeWarning, match=r"dark.tiff: 16-bit image uses only values up to 4095 \(6.2% of"):
        img = load_rgb(tmp_path / "dark.tiff")
    assert img.max() == 16  # read as stated (16-bit), not stretched: the warning is the user's cue
    tifffile.imwrite(tmp_path / "full.tiff", _ramp16(65535))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_rgb(tmp_path / "full.tiff").max() == 255


def test_float32_tiffs_in_0_1_are_scaled_and_others_refused(tmp_path):
    ramp = np.linspace(0, 1, 40 * 40 * 3, dtype=np.float32).reshape(40, 40, 3)
    tifffile.imwrite(tmp_path / "unit.tiff", ramp, photometric="rgb")
    img = load_rgb(tmp_path / "unit.tiff")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    tifffile.imwrite(tmp_path / "wide.tiff", ramp * 300, photometric="rgb")
    with pytest.raises(ImageError, match=r"wide.tiff: floating-point image \(float32\) with values 0 to 300, outside"):
        load_rgb(tmp_path / "wide.tiff")
    nan = ramp.copy()
    nan[0, 0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tiff", nan, photometric="rgb")
    with pytest.raises(ImageError, match="NaN or infinite"):
        load_rgb(tmp_path / "nan.tiff")


def test_data_summary_on_float32_and_12_bit_tiffs_does_not_traceback(tmp_path, capsys):
    ramp = np.linspace(0, 1, 40 * 40 * 3, dtype=np.float32).reshape(40, 40, 3)
    (tmp_path / "NGS").mkdir()
    (tmp_path / "LYT").mkdir()
    tifffile.imwrite(tmp_path / "NGS" / "unit.tiff", ramp, photometric="rgb")
    tifffile.imwrite(tmp_path / "NGS" / "wide.tiff", ramp * 300, photometric="rgb")
    tifffile.imwrite(tmp_path / "LYT" / "b12.tiff", _ramp16(4095), bitspersample=12)
    tifffile.imwrite(tmp_path / "LYT" / "dark.tiff", _ramp16(4095))
    assert main(["data", "summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiff:float32x3 1" in out and "tiff:uint16x3 1" in out
    assert "wide.tiff: floating-point image" in out
    assert "1 images use a small part of their sample range and will look dark, e.g. " in out and "dark.tiff" in out
    ds = check_images(read_dataset(tmp_path))
    assert len(ds) == 3 and [s["path"].endswith("wide.tiff") for s in ds.skipped] == [True]
    assert ds.extra["images"]["dark_warnings"] == 1


def test_a_tiff_with_too_many_samples_per_pixel_is_refused_before_decoding(tmp_path):
    tifffile.imwrite(tmp_path / "deep.tiff", np.zeros((10, 10, 50), np.uint8), planarconfig="contig",
                     photometric="minisblack")
    with pytest.raises(ImageError, match=r"deep.tiff: unsupported TIFF layout: 5000 samples"):
        load_rgb(tmp_path / "deep.tiff", max_pixels=1000)


@pytest.mark.parametrize("bad", BAD_UM)
def test_train_model_scale_goes_through_the_one_validator(bad):
    with pytest.raises(ValueError, match=r"um_per_px of the model input \(--um-per-px\) .*0\.02-1 µm/px"):
        TrainConfig(model="plain_cnn", um_per_px=bad).resolved()
    assert TrainConfig(model="plain_cnn", um_per_px=0.3).resolved().um_per_px == 0.3
