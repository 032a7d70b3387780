"""The review as a library object: import, native crops, decisions, conflicts, sign-off, rounds,
the differential, exports and every bad input (with nothing overwritten)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukoscope import taxonomy
from leukoscope.data import read_dataset
from leukoscope.imaging.images import load_rgb
from leukoscope.review import (ConflictError, ReadOnlyError, ReviewDatabaseError, ReviewInputError, ReviewStore,
                               SignOffError, export_differential, export_labels)
from leukoscope.review.labels import KEYS, LABELS
from leukoscope.review.schema import MIGRATIONS, SCHEMA_VERSION
from leukoscope.screen.count import count_summary
from leukoscope.screen.crops import MIN_CROP_UM
from review_helpers import copy_run, run, store  # noqa: F401 (fixtures)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _review_everything(store, label="LYT", who="Dr A"):
    for c in store.cells():
        if c["label"] != label:
            store.reclassify(c["id"], label, who, c["version"])
    store.mark_seen(c["id"] for c in store.cells())


def test_keys_cover_every_class_and_outcome_once():
    assert sorted(KEYS.values()) == sorted(LABELS)
    assert set(taxonomy.CLASSES) < set(LABELS) and {"unidentified", "not_leukocyte", "artefact"} < set(LABELS)
    assert len(set(KEYS)) == 18


def test_import_cuts_native_resolution_crops_from_the_original_smear(run, store):
    cells = pd.read_csv(run["screen"] / "cells.csv")
    assert store.progress()["cells"] == len(cells) > 0
    smear = load_rgb(run["smear"])
    for c in store.cells():
        crop = _png(store.crop_png(c["id"]))
        bw, bh = c["x1"] - c["x0"], c["y1"] - c["y0"]
        assert crop.shape[0] == crop.shape[1] >= max(bw, bh) > 32  # the smear's pixels, not the 32 px model input
        # the crop's inside is the smear itself, pixel for pixel
        ox, oy = c["crop_x0"], c["crop_y0"]
        y0, x0 = max(0, oy), max(0, ox)
        y1, x1 = min(smear.shape[0], oy + crop.shape[0]), min(smear.shape[1], ox + crop.shape[1])
        assert np.array_equal(crop[y0 - oy:y1 - oy, x0 - ox:x1 - ox], smear[y0:y1, x0:x1])
        assert c["um_per_px"] == pytest.approx(0.1)
        # at least an LMU cell image's field of view, so that exported crops carry the context the model saw
        assert crop.shape[0] * c["um_per_px"] >= MIN_CROP_UM
    field = store.field(store.cells()[0]["image"])
    over = _png(field["overview"])
    assert (field["width"], field["height"]) == (1400, 900)
    assert max(over.shape[:2]) <= 1200 and over.shape[1] * field["overview_factor"] >= 1400 - field["overview_factor"]
    assert store.run["model_sha256"] == hashlib.sha256(run["model"].read_bytes()).hexdigest()
    assert store.run["kind"] == "screen" and store.run["model_name"] == "plain_cnn"


def test_scans_are_read_region_by_region_with_the_same_crops(run, store, tmp_path, monkeypatch):
    from leukoscope.review import importer
    from leukoscope.screen import tiles

    opened = []
    real_open = tiles.open_smear

    def tiled_open(path):
        smear = real_open(path, max_whole_pixels=100_000)  # this 1400 x 900 field read as a scan would be
        opened.append(smear.tiled)
        return smear

    monkeypatch.setattr(importer, "open_smear", tiled_open)
    monkeypatch.setattr(importer, "STRIP_PIXELS", 200_000)
    with ReviewStore.open_or_create(copy_run(run, tmp_path / "scan")) as scan:
        assert opened == [True]
        for a, b in zip(store.cells(), scan.cells()):
            assert a["id"] == b["id"] and np.array_equal(_png(store.crop_png(a["id"])), _png(scan.crop_png(b["id"])))
        f1, f2 = store.field(a["image"]), scan.field(a["image"])
        assert np.array_equal(_png(f1["overview"]), _png(f2["overview"]))


def test_model_input_view_is_what_the_screen_classified(run, store):
    import torch

    from leukoscope.models.bundle import load_bundle
    from leukoscope.review.model_views import ModelViews

    cells = pd.read_csv(run["screen"] / "cells.csv")
    bundle = load_bundle(run["model"])
    classes = list(bundle.classes)
    views = ModelViews(store)
    for c in store.cells():
        x, note = views._input(c["id"])
        assert note == "cut from the original smear" and x.shape == (32, 32, 3)
        row = cells[(cells.x0 == c["x0"]) & (cells.y0 == c["y0"])].iloc[0]
        p = bundle.predict_proba(torch.from_numpy(x[None]))[0]
        assert np.allclose(p, row[[f"prob_{k}" for k in classes]].to_numpy(float), atol=1e-5)


def test_database_is_versioned_wal_and_synchronous_full(store):
    con = store._con
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS) >= 1
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_gallery_order_groups_by_call_most_blast_like_first(store):
    cells = store.cells()
    order = [LABELS.index(c["label"]) for c in cells]
    assert order == sorted(order)
    for lab in set(c["label"] for c in cells):
        pb = [c["p_blast"] for c in cells if c["label"] == lab]
        assert pb == sorted(pb, reverse=True)


def test_reclassify_versions_conflicts_and_audit(store):
    c = store.cells()[0]
    first = store.reclassify(c["id"], "MYO", "Dr A", c["version"])
    assert first == {"cell_id": c["id"], "label": "MYO", "version": c["version"] + 1, "from": c["label"]}
    with pytest.raises(ConflictError, match="changed meanwhile"):
        store.reclassify(c["id"], "NGS", "Dr B", c["version"])  # the second tab still has the old version
    assert store.cell(c["id"])["label"] == "MYO"
    with pytest.raises(ValueError, match="unknown label 'XYZ'"):
        store.reclassify(c["id"], "XYZ", "Dr A", first["version"])
    with pytest.raises(ValueError, match="reviewer's name"):
        store.reclassify(c["id"], "NGS", "  ", first["version"])
    store.reclassify(c["id"], "NGS", "Dr B", first["version"])
    trail = store.audit(c["id"])
    assert [(a["from_label"], a["to_label"], a["who"]) for a in trail] == [(c["label"], "MYO", "Dr A"),
                                                                           ("MYO", "NGS", "Dr B")]
    assert all(a["at"] and a["round"] == 1 for a in trail)
    assert store.cell(c["id"])["seen"]


def test_sign_off_needs_every_cell_seen_and_none_unidentified(store):
    cells = store.cells()
    with pytest.raises(SignOffError, match="not yet seen"):
        store.sign_off("Dr A", "S-1")
    store.mark_seen(c["id"] for c in cells)
    left = [c for c in store.cells() if c["label"] == "unidentified"]
    if left:
        with pytest.raises(SignOffError, match="still unidentified"):
            store.sign_off("Dr A", "S-1")
    _review_everything(store)
    with pytest.raises(SignOffError, match="specimen"):
        store.sign_off("Dr A", "")
    signed = store.sign_off("Dr A", "S-1", "ok")
    assert signed["signed"] and signed["reviewer"] == "Dr A" and signed["specimen"] == "S-1" and signed["signed_at"]
    with pytest.raises(ReadOnlyError, match="read-only"):
        store.reclassify(cells[0]["id"], "MYO", "Dr A", store.cell(cells[0]["id"])["version"])
    with pytest.raises(ReadOnlyError):
        store.sign_off("Dr A", "S-1")


def test_new_round_keeps_the_signed_one(store):
    with pytest.raises(ReadOnlyError, match="still open"):
        store.new_round("Dr A")
    _review_everything(store, "LYT")
    store.sign_off("Dr A", "S-1")
    assert store.new_round("Dr B") == 2
    c = store.cells()[0]
    assert c["label"] == "LYT" and not c["seen"] and c["version"] == 0
    store.reclassify(c["id"], "MOB", "Dr B", 0)
    assert store.cell(c["id"], round_=1)["label"] == "LYT"
    assert store.differential(1)["after"]["differential"]["LYT"]["n"] == len(store.cells())
    assert [r["signed"] for r in store.rounds()] == [1, 0]
    assert store.audit()[-1]["round"] == 2


def test_differential_recounts_reviewed_calls_with_every_class(store):
    cells = store.cells()
    store.reclassify(cells[0]["id"], "MYO", "Dr A", cells[0]["version"])
    store.reclassify(cells[1]["id"], "artefact", "Dr A", cells[1]["version"])
    d = store.differential()
    assert list(d["after"]["differential"]) == list(taxonomy.CLASSES)  # zero classes included
    labels = [c["label"] for c in store.cells() if c["label"] not in ("artefact", "not_leukocyte")]
    expected = count_summary(labels, None, taxonomy.CLASSES)
    for k in ("cells_found", "identified", "unidentified", "blast_pct", "blast_pct_ci", "flags"):
        assert d["after"][k] == expected[k]
    assert d["after"]["differential"]["MYO"]["n"] >= 1 and d["excluded"]["artefact"] == 1
    assert d["before"]["cells_found"] == len(cells) and d["changed"] >= 2


def test_export_differential_and_labels(store, run, tmp_path):
    with pytest.raises(SignOffError, match="not signed off"):
        export_differential(store, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    cells = store.cells()
    _review_everything(store, "LYT")
    store.reclassify(cells[0]["id"], "MYO", "Dr A", store.cell(cells[0]["id"])["version"])
    store.reclassify(cells[1]["id"], "not_leukocyte", "Dr A", store.cell(cells[1]["id"])["version"])
    store.sign_off("Dr A", "S-42", "checked")
    paths = export_differential(store, tmp_path / "out")
    table = pd.read_csv(paths["csv"])
    assert set(table["specimen"]) == {"S-42"} and set(table["reviewer"]) == {"Dr A"}
    assert set(table["model_sha256"]) == {hashlib.sha256(run["model"].read_bytes()).hexdigest()}
    by = table.set_index("class")
    assert set(taxonomy.CLASSES) <= set(by.index)
    n = len(cells)
    assert by.loc["LYT", "n_after"] == n - 2 and by.loc["MYO", "n_after"] == 1 and by.loc["BAS", "n_after"] == 0
    assert by.loc["not_leukocyte", "n_after"] == 1
    assert by["n_before"][list(taxonomy.CLASSES) + ["unidentified"]].sum() == n
    rec = json.loads(paths["json"].read_text())
    assert rec["after"]["blast_pct"] == pytest.approx(100 / (n - 1))
    assert rec["after"]["blast_pct_ci"][0] < rec["after"]["blast_pct"] < rec["after"]["blast_pct_ci"][1]
    assert rec["leukoscope_version"] and rec["scale"].endswith("(file metadata (TIFF resolution))")
    html = paths["html"].read_text()
    assert "S-42" in html and "Dr A" in html and "DRAFT" not in html
    res = export_labels(store, tmp_path / "labels")
    assert res["written"] == n - 1 and res["left_out"]["not_leukocyte"] == 1
    ds = read_dataset(tmp_path / "labels")
    assert len(ds) == n - 1 and ds.counts()["MYO"] == 1 and ds.counts()["LYT"] == n - 2
    assert set(ds.table["patient"]) == {"S-42"} and np.allclose(ds.table["um_per_px"].astype(float), 0.1)
    assert ds.table["source"].iloc[0].startswith("review:")
    first = ds.table.sort_values("path").iloc[0]
    assert load_rgb(first["path"]).shape[0] > 32


# ------------------------------------------------------------------------------ bad input


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ReviewInputError, match="not a 'leukoscope screen' output"):
        ReviewStore.open_or_create(tmp_path)
    bad_csv = tmp_path / "table.csv"
    bad_csv.write_text("a,b\n1,2\n")
    with pytest.raises(ReviewInputError, match="not a 'leukoscope predict' table"):
        ReviewStore.open_or_create(bad_csv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "table.csv"]


def test_a_database_of_another_run_is_refused_and_kept(run, tmp_path):
    a = copy_run(run, tmp_path / "a")
    ReviewStore.open_or_create(a).close()
    db = a / "review.sqlite"
    before = db.read_bytes()
    cells = pd.read_csv(a / "cells.csv")
    cells.loc[0, "p_blast"] = 0.99  # the folder now holds another screen's results
    cells.to_csv(a / "cells.csv", index=False)
    with pytest.raises(ReviewDatabaseError, match="belongs to another run"):
        ReviewStore.open_or_create(a)
    b = copy_run(run, tmp_path / "b")
    (b / "summary.json").write_text((b / "summary.json").read_text().replace('"refer_below": 0.5', '"refer_below": 0.6'))
    with pytest.raises(ReviewDatabaseError, match="belongs to another run"):
        ReviewStore.open_or_create(b, db=db)
    assert db.read_bytes() == before and not (b / "review.sqlite").exists()


def test_a_missing_smear_image_is_named_and_nothing_is_created(run, tmp_path):
    out = copy_run(run, tmp_path)
    cells = pd.read_csv(out / "cells.csv")
    cells["image"] = str(tmp_path / "gone.tif")
    cells.to_csv(out / "cells.csv", index=False)
    before = sorted(p.name for p in out.iterdir())
    assert {"cells.csv", "summary.json"} <= set(before)
    with pytest.raises(ReviewInputError, match="gone.tif"):
        ReviewStore.open_or_create(out)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing created (the run's crops/ folder was there)


def test_a_corrupt_or_foreign_database_is_refused_untouched(tmp_path):
    bad = tmp_path / "review.sqlite"
    bad.write_bytes(b"this is not a database" * 50)
    with pytest.raises(ReviewDatabaseError, match="not an SQLite file"):
        ReviewStore(bad)
    assert bad.read_bytes() == b"this is not a database" * 50 and sorted(tmp_path.iterdir()) == [bad]
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(ReviewDatabaseError, match="not a LeukoScope review database"):
        ReviewStore(other)
    with pytest.raises(ReviewDatabaseError, match="not found"):
        ReviewStore(tmp_path / "missing.sqlite")


def test_a_truncated_database_is_refused(store, tmp_path):
    store.close()
    data = store.path.read_bytes()
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ReviewDatabaseError):
        ReviewStore(cut)
    store._con = sqlite3.connect(":memory:")  # for the fixture's close()


def test_a_newer_schema_is_refused(store):
    store._con.execute("PRAGMA user_version=99")
    store.close()
    with pytest.raises(ReviewDatabaseError, match="newer than this"):
        ReviewStore(store.path)
    store._con = sqlite3.connect(":memory:")


# ------------------------------------------------------------------------------ predict runs


def test_a_predict_table_is_reviewed_with_each_file_as_its_crop(run, tmp_path):
    from leukoscope.models.bundle import load_bundle
    from leukoscope.predict import predict_paths

    files = sorted((run["root"] / "cells").rglob("*.tif*"))[:6]
    res = predict_paths(load_bundle(run["model"]), files)
    csv = tmp_path / "predictions.csv"
    res.table.to_csv(csv, index=False)
    with ReviewStore.open_or_create(csv, model=run["model"], um_per_px=0.2) as store:
        assert store.run["kind"] == "predict" and store.progress()["cells"] == 6
        assert store.run["model_sha256"] == hashlib.sha256(run["model"].read_bytes()).hexdigest()
        for c in store.cells():
            assert np.array_equal(_png(store.crop_png(c["id"])), load_rgb(c["image"]))
            assert c["um_per_px"] == 0.2
            top = max(res.table.loc[res.table.path == c["image"], [f"prob_{k}" for k in run_classes(res)]].iloc[0])
            assert c["top3"][0][1] == pytest.approx(top, abs=1e-6)
        assert store.field(store.cells()[0]["image"]) is None
    res.table.loc[0, "path"] = str(tmp_path / "missing.tif")
    res.table.to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(ReviewInputError, match="missing.tif"):
        ReviewStore.open_or_create(tmp_path / "broken.csv")
    assert not (tmp_path / "broken.review.sqlite").exists()


def run_classes(res) -> list[str]:
    return [c[len("prob_"):] for c in res.table.columns if c.startswith("prob_")]


def test_model_input_falls_back_to_the_stored_crop_when_the_smear_moved(run, tmp_path):
    from leukoscope.review.model_views import ModelViews

    smear = tmp_path / "field.tif"
    shutil.copy(run["smear"], smear)
    out = copy_run(run, tmp_path)
    for name in ("cells.csv", "summary.json"):  # the run screened the copy
        (out / name).write_text((out / name).read_text().replace(str(run["smear"]), str(smear)))
    with ReviewStore.open_or_create(out) as store:
        cid = store.cells()[0]["id"]
        x, note = ModelViews(store)._input(cid)
        assert note == "cut from the original smear"
        smear.unlink()
        y, note = ModelViews(store)._input(cid)
        assert note.startswith("smear image not found") and y.shape == x.shape
        assert np.abs(y.astype(int) - x.astype(int)).mean() < 40  # the same cell, edges reflected
