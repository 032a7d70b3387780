"""The smear screen end to end: engine, tiles, checkpoints, referral, bad inputs, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from leukoscope import taxonomy
from leukoscope.screen import tiles as tiles_mod
from leukoscope.screen.detect import match_boxes
from leukoscope.screen.engine import ScreenEngine, cell_columns
from leukoscope.synth import make_smear, write_smear


class ScriptedBundle:
    """A test double with the bundle interface: every cell gets class ``cls`` with the next
    confidence of ``confidences`` (cycled), the rest of the mass spread evenly."""

    def __init__(self, confidences=(0.9,), cls="MYO", input_size=32):
        self.meta = {"classes": list(taxonomy.CLASSES), "input_size": input_size, "um_per_px": 29.0 / input_size,
                     "temperature": 1.0, "model": "scripted"}
        self.classes = taxonomy.CLASSES
        self.confidences = list(confidences)
        self.k = taxonomy.class_index(cls)
        self.i = 0
        self.seen = []

    def predict_proba_prepared(self, images, batch_size=64, calibrated=True):
        images = np.asarray(images)
        self.seen.append(images.shape)
        out = np.zeros((len(images), len(self.classes)))
        for r in range(len(images)):
            c = self.confidences[self.i % len(self.confidences)]
            self.i += 1
            out[r] = (1 - c) / (len(self.classes) - 1)
            out[r, self.k] = c
        return out


def _boxes(df):
    return df[["x0", "y0", "x1", "y1"]].to_numpy()


@pytest.fixture(scope="module")
def smear_tif(tmp_path_factory):
    d = tmp_path_factory.mktemp("smear")
    path, truth = write_smear(d / "field.tif", 1400, 900, n_leukocytes=8, seed=11, um_per_px=0.1)
    return path, pd.read_csv(truth)


def test_screen_finds_and_counts_the_known_leukocytes(smear_tif, tmp_path):
    path, truth = smear_tif
    bundle = ScriptedBundle([0.9])
    res = ScreenEngine(bundle, progress=False).screen([path], out_dir=tmp_path)
    im = res.summary["images"][0]
    assert im["status"] == "ok"
    assert im["um_per_px"] == pytest.approx(0.1) and "TIFF" in im["um_per_px_source"]
    tp, fp, fn, _ = match_boxes(_boxes(res.cells), _boxes(truth))
    assert tp == len(truth) and fp == 0
    assert bundle.seen[0][1:] == (32, 32, 3)  # crops at the model's size
    assert list(res.cells.columns) == cell_columns(taxonomy.CLASSES)
    ov = res.summary["overall"]
    assert ov["cells_found"] == len(truth) and ov["differential"]["MYO"]["n"] == len(truth)
    assert ov["blast_pct"] == pytest.approx(100.0) and ov["flags"]["blasts_ge_20pct"]
    paths = res.write(tmp_path, bundle=None)
    cells = pd.read_csv(paths["cells"])
    assert len(cells) == len(truth) and {"p_blast", "p_atypical", "prob_MYO"} <= set(cells.columns)
    summary = json.loads(paths["summary"].read_text())
    assert summary["images"][0]["um_per_px_source"].startswith("file metadata")
    html = paths["review"].read_text()
    assert "Not for diagnostic use" in html and "MYO" in html


def test_referral_sends_low_confidence_cells_to_unidentified(smear_tif):
    path, truth = smear_tif
    bundle = ScriptedBundle([0.9, 0.3])  # every second cell is unsure
    res = ScreenEngine(bundle, refer_below=0.5, progress=False).screen([path])
    cells = res.cells
    assert (cells.pred == "unidentified").sum() == len(truth) // 2
    assert (cells.referred == (cells.confidence < 0.5)).all()
    assert (cells.loc[cells.referred, "model_pred"] == "MYO").all()
    ov = res.summary["overall"]
    assert ov["unidentified"] == len(truth) // 2 and ov["identified"] == len(truth) - len(truth) // 2
    assert ov["flags"]["has_unidentified"]
    # nothing referred at threshold 0
    res0 = ScreenEngine(ScriptedBundle([0.9, 0.3]), refer_below=0.0, progress=False).screen([path])
    assert (res0.cells.pred != "unidentified").all()


def test_cell_on_a_tile_edge_is_counted_once(tmp_path, monkeypatch):
    um = 0.1
    img, truth = make_smear(1500, 700, n_leukocytes=6, seed=21, um_per_px=um)
    row = truth.assign(cx=(truth.x0 + truth.x1) / 2).sort_values("cx").iloc[-1]
    boundary = int(row.cx) // 2 * 2  # even: the detector's block factor at 0.1 µm/px is 2
    assert row.x0 < boundary < row.x1
    path = tmp_path / "edge.tif"
    import tifffile

    tifffile.imwrite(path, img, photometric="rgb", tile=(128, 128), resolution=(1e4 / um, 1e4 / um),
                     resolutionunit="CENTIMETER")
    monkeypatch.setattr(tiles_mod, "WHOLE_READ_PIXELS", 1000)  # force zarr tile reads
    tiled = ScreenEngine(ScriptedBundle(), tile_size=boundary, progress=False).screen([path])
    whole = ScreenEngine(ScriptedBundle(), tile_size=4096, progress=False).screen([path])
    assert tiled.summary["images"][0]["tiles"] > 1
    assert len(tiled.cells) == len(whole.cells) == len(truth)
    # the tiled screen sees exactly what the whole-field screen sees
    key = ["x0", "y0", "x1", "y1"]
    a = tiled.cells[key].sort_values(key).to_numpy()
    b = whole.cells[key].sort_values(key).to_numpy()
    assert np.abs(a - b).max() <= 2
    tp, fp, fn, _ = match_boxes(_boxes(tiled.cells), _boxes(truth), iou=0.3)
    assert (tp, fp, fn) == (len(truth), 0, 0)
    straddler = tiled.cells[(tiled.cells.x0 < boundary) & (tiled.cells.x1 > boundary)]
    assert len(straddler) >= 1


def test_detection_threads_find_the_same_cells_in_the_same_order(smear_tif, tmp_path, monkeypatch):
    """Tiles read and analysed by 1 or 3 threads at once: the same cells, rows, checkpoint and crops."""
    path, truth = smear_tif
    monkeypatch.setattr(tiles_mod, "WHOLE_READ_PIXELS", 1000)  # tiled reads: many tiles
    runs = {}
    for n in (1, 3):
        out = tmp_path / f"w{n}"
        res = ScreenEngine(ScriptedBundle(), tile_size=256, progress=False, workers=n).screen([path], out_dir=out)
        assert res.summary["images"][0]["tiles"] > 4
        runs[n] = (res.cells, sorted(p.name for p in (out / "crops").rglob("*.png")))
    pd.testing.assert_frame_equal(runs[1][0], runs[3][0])
    assert runs[1][1] == runs[3][1] and len(runs[1][1]) == len(runs[1][0]) >= len(truth) - 1
    # each stored crop is the cell at native resolution, as cut from the whole smear (tile-edge cells included)
    from PIL import Image

    from leukoscope.screen.crops import background_colour, native_crop
    from leukoscope.screen.tiles import open_smear

    whole = open_smear(path, max_whole_pixels=10**9)
    bg = background_colour(whole.sample())
    for row in runs[3][0].itertuples():
        want = native_crop(whole.read, whole.shape, (row.x0, row.y0, row.x1, row.y1), whole.um_per_px, bg)
        got = np.asarray(Image.open(tmp_path / "w3" / row.crop_native).convert("RGB"))
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="workers"):
        ScreenEngine(ScriptedBundle(), workers=0)


def test_native_crops_of_cross_tile_duplicates_are_removed(smear_tif, tmp_path, monkeypatch):
    """Cells seen by two tiles and dropped as duplicates leave no orphan crop in DIR/crops."""
    path, truth = smear_tif
    monkeypatch.setattr(tiles_mod, "WHOLE_READ_PIXELS", 1000)
    monkeypatch.setattr(tiles_mod.Tile, "owns", lambda self, cx, cy: True)  # every tile keeps all it reads
    out = tmp_path / "o"
    res = ScreenEngine(ScriptedBundle(), tile_size=256, progress=False, fast=False, workers=1).screen(
        [path], out_dir=out)
    assert res.summary["images"][0]["duplicates_removed"] > 0
    on_disk = {p.relative_to(out).as_posix() for p in (out / "crops").rglob("*.png")}
    assert on_disk == set(res.cells["crop_native"]) and len(on_disk) == len(res.cells)


def test_interrupted_screen_resumes_from_checkpoint(smear_tif, tmp_path, monkeypatch):
    path, truth = smear_tif
    monkeypatch.setattr(tiles_mod, "WHOLE_READ_PIXELS", 1000)
    first = ScreenEngine(ScriptedBundle(), tile_size=512, progress=False).screen([path], out_dir=tmp_path)
    n_tiles = first.summary["images"][0]["tiles"]
    assert n_tiles > 2
    ck = next((tmp_path / "checkpoint").glob("*.jsonl"))
    lines = ck.read_text().splitlines()
    ck.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # header, calibration, 2 tiles, a cut line
    bundle = ScriptedBundle()
    again = ScreenEngine(bundle, tile_size=512, progress=False).screen([path], out_dir=tmp_path)
    assert again.summary["images"][0]["tiles_resumed"] == 2
    pd.testing.assert_frame_equal(first.cells[["x0", "y0", "x1", "y1"]], again.cells[["x0", "y0", "x1", "y1"]])
    third = ScreenEngine(ScriptedBundle(), tile_size=512, progress=False).screen([path], out_dir=tmp_path)
    assert third.summary["images"][0]["tiles_resumed"] == n_tiles


def test_bad_inputs_end_clearly_and_never_lose_the_others(smear_tif, tmp_path):
    good, truth = smear_tif
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((300, 400, 3), (232, 230, 226), np.uint8)).save(blank)
    empty_field = tmp_path / "no_wbc.tif"
    write_smear(empty_field, 600, 500, n_leukocytes=0, seed=2, um_per_px=0.1)
    absurd = tmp_path / "absurd.tif"
    import tifffile

    tifffile.imwrite(absurd, np.full((64, 64, 3), 200, np.uint8), photometric="rgb",
                     resolution=(1e4 / 50, 1e4 / 50), resolutionunit="CENTIMETER")  # 50 µm/px
    missing = tmp_path / "missing.jpg"
    res = ScreenEngine(ScriptedBundle(), progress=False).screen([text, blank, empty_field, absurd, missing, good],
                                                                out_dir=tmp_path / "out")
    by = {im["image"]: im for im in res.summary["images"]}
    assert by[str(text)]["status"] == "error" and "not an image" in by[str(text)]["error"]
    assert by[str(blank)]["status"] == "error" and "--um-per-px" in by[str(blank)]["error"]
    assert by[str(empty_field)]["status"] == "ok" and by[str(empty_field)]["cells_found"] == 0
    assert by[str(empty_field)]["flags"]["no_leukocytes"]
    assert by[str(absurd)]["status"] == "error" and "plausible range" in by[str(absurd)]["error"]
    assert by[str(missing)]["status"] == "error" and "not found" in by[str(missing)]["error"]
    assert by[str(good)]["status"] == "ok" and by[str(good)]["cells_found"] == len(truth)
    assert res.summary["overall"]["images_failed"] == 4
    # a blank field with a given scale is a clear empty result
    res2 = ScreenEngine(ScriptedBundle(), um_per_px=0.1, progress=False).screen([blank])
    assert res2.summary["images"][0]["status"] == "ok" and res2.cells.empty
    paths = res2.write(tmp_path / "out2")
    assert pd.read_csv(paths["cells"]).empty and "No cells to review" in paths["review"].read_text()
    with pytest.raises(ValueError, match="plausible range"):
        ScreenEngine(ScriptedBundle(), um_per_px=0.0001)


def test_scale_without_metadata_is_estimated_and_recorded(tmp_path):
    img, truth = make_smear(1000, 800, n_leukocytes=3, seed=8, um_per_px=0.08)
    with pytest.warns(UserWarning, match="estimated"):
        res = ScreenEngine(ScriptedBundle(), progress=False).screen([img], names=["array"])
    im = res.summary["images"][0]
    assert im["um_per_px"] == pytest.approx(0.08, rel=0.15)
    assert "estimated" in im["um_per_px_source"] and im["warnings"]
    assert len(res.cells) == len(truth)


def test_cli_screen_with_a_real_bundle(smear_tif, tmp_path, capsys):
    import torch

    from leukoscope.cli.main import main
    from leukoscope.models.bundle import make_meta, save_bundle
    from leukoscope.models.registry import create_model, get_config

    torch.manual_seed(0)
    cfg = get_config("plain_cnn", input_size=32)
    model = create_model("plain_cnn", num_classes=len(taxonomy.CLASSES), input_size=32)
    meta = make_meta(classes=taxonomy.CLASSES, model="plain_cnn", input_size=32, mean=cfg.mean, std=cfg.std,
                     um_per_px=cfg.um_per_px, temperature=2.0)
    bundle = save_bundle(model, meta, tmp_path / "model.safetensors")
    good, truth = smear_tif
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    out = tmp_path / "out"
    rc = main(["screen", str(bundle), str(good), str(bad), "--out", str(out), "--quiet", "--refer-below", "0.01"])
    assert rc == 0
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == len(truth)
    probs = cells[[f"prob_{c}" for c in taxonomy.CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["temperature"] == 2.0 and len(summary["errors"]) == 1
    html = (out / "review.html").read_text()
    assert html.count("data:image/png;base64,") >= len(truth)
    err = capsys.readouterr().err
    assert "bad.tif" in err
    with pytest.raises(SystemExit) as exc:  # a usage error: argparse's exit, the subcommand's usage printed
        main(["screen", str(bundle), str(good), "--out", str(out), "--um-per-px", "50"])
    assert exc.value.code == 2 and "plausible range" in capsys.readouterr().err


def test_review_saliency_explains_the_input_a_white_balancing_bundle_classified(tmp_path, monkeypatch):
    """A white-balancing bundle screened on a smear with a colour cast: the review page's saliency
    is computed on exactly the tensor the model classified (white-balanced), not on unbalanced crops."""
    import torch
    from PIL import Image

    from leukoscope.models.bundle import load_bundle, make_meta, save_bundle
    from leukoscope.models.registry import create_model, get_config
    from leukoscope.screen import review
    from leukoscope.synth import make_smear

    torch.manual_seed(0)
    cfg = get_config("plain_cnn", input_size=32)
    model = create_model("plain_cnn", num_classes=len(taxonomy.CLASSES), input_size=32)
    meta = make_meta(classes=taxonomy.CLASSES, model="plain_cnn", input_size=32, mean=cfg.mean, std=cfg.std,
                     um_per_px=cfg.um_per_px, temperature=1.0, white_balance=True)
    bundle = load_bundle(save_bundle(model, meta, tmp_path / "model.safetensors"))
    assert [s["name"] for s in bundle.meta["pipeline"]["steps"]][0] == "white_balance"
    img, truth = make_smear(900, 700, n_leukocytes=4, seed=3, um_per_px=0.1)
    cast = (img.astype(np.float32) * np.array([1.0, 0.85, 0.7], np.float32)).clip(0, 255).astype(np.uint8)
    path = tmp_path / "cast.png"
    Image.fromarray(cast).save(path)

    classified = []
    bundle.model.register_forward_pre_hook(lambda m, args: classified.append(args[0].detach().clone()))
    res = ScreenEngine(bundle, um_per_px=0.1, progress=False).screen([path])
    assert len(res.cells) >= 1
    seen = torch.cat(classified)
    explained = []
    monkeypatch.setattr(review, "saliency_map",
                        lambda model, x, target: explained.append(torch.as_tensor(x).clone()) or
                        np.zeros((len(x), 32, 32)))
    ctx = review.review_context(res, bundle)
    assert explained and not any("skipped" in n for n in ctx["notes"])
    x = explained[0]
    assert len(x) == min(len(res.cells), review.MAX_SALIENCY)
    for row in x:  # every saliency input is one of the inputs the model classified, bit for bit
        assert any(torch.allclose(row, c.contiguous(), atol=1e-6) for c in seen), "saliency on an unclassified input"
    # and the cast really matters: without white balance the same crops would be different inputs
    plain = make_meta(classes=taxonomy.CLASSES, model="plain_cnn", input_size=32, mean=cfg.mean, std=cfg.std,
                      um_per_px=cfg.um_per_px, temperature=1.0)
    from leukoscope.screen.crops import model_crops

    cx, cy = res.cells.cx.iloc[0], res.cells.cy.iloc[0]
    assert not np.array_equal(model_crops(cast, [(cx, cy)], 0.1, plain), model_crops(cast, [(cx, cy)], 0.1, meta))
