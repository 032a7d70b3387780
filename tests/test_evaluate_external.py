"""leukoscope evaluate: per-source metrics of a tiny bundle, unknown classes counted, OOD warning for a shifted set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukoscope.evaluate.external import evaluate_sets, group_labels, validation_table, write_outputs
from leukoscope.models.ood import fit_reference, store_reference
from leukoscope.models.bundle import load_bundle, make_meta, save_bundle
from leukoscope.models.registry import create_model

SMALL = {"widths": [8, 16], "hidden": 16, "dropout": 0.0}
MODEL_CLASSES = ("EOS", "LYT", "NGS")


def tiny_bundle(path, um_per_px=29.0 / 48):
    import torch

    torch.manual_seed(0)
    model = create_model("plain_cnn", num_classes=len(MODEL_CLASSES), **SMALL).eval()
    meta = make_meta(classes=MODEL_CLASSES, model="plain_cnn", input_size=48, mean=(0.5,) * 3, std=(0.25,) * 3,
                     um_per_px=um_per_px, temperature=1.0, config={"model_kwargs": SMALL, "val_fraction": 0.2,
                                                                   "seed": 0})
    return save_bundle(model, meta, path)


def pbc_cells(table, label, n, offset):
    """``n`` real PBC cells of class ``label`` (read in place, never copied)."""
    t = table[table["label"] == label].sort_values("path").iloc[offset:offset + n]
    return t[["path", "label"]].assign(source="pbc")


def inverted_copies(table, root):
    """Colour-inverted copies of the images of ``table`` in ``root``: an obviously shifted set."""
    from leukoscope.imaging.images import load_rgb

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, r in enumerate(table.itertuples(index=False)):
        p = root / f"{r.label}_{i}.png"
        Image.fromarray(255 - load_rgb(r.path)).save(p)
        rows.append({"path": str(p), "label": r.label, "source": "inverted"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from conftest import shared_path

    from leukoscope.data.readers import read_manifest

    pbc = read_manifest(shared_path("pbc"), check_files=False).table
    base = tmp_path_factory.mktemp("ev")
    ref = pd.concat([pbc_cells(pbc, c, 15, 0) for c in MODEL_CLASSES], ignore_index=True)
    normal = pd.concat([pbc_cells(pbc, c, 5, 100) for c in MODEL_CLASSES + ("BAS",)], ignore_index=True)
    normal["source"] = "normal"
    inverted = inverted_copies(pd.concat([pbc_cells(pbc, c, 5, 200) for c in MODEL_CLASSES]), base / "inv")
    (base / "data").mkdir()
    pd.concat([normal, inverted]).to_csv(base / "data" / "labels.csv", index=False)
    (base / "reference").mkdir()
    ref.to_csv(base / "reference" / "labels.csv", index=False)
    path = tiny_bundle(base / "model.safetensors")
    return base, ref, normal, inverted, path


def test_reference_is_stored_in_the_bundle_and_reloads(sets):
    base, ref, _, _, path = sets
    b = load_bundle(path)
    r = fit_reference(b, ref, um_per_px=0.1)
    assert r["n"] == len(ref) and r["dims"] >= 1 and set(r["class_means"]) == set(MODEL_CLASSES)
    assert 0 < r["distance_quantiles"]["q50"] <= r["distance_quantiles"]["q95"]
    assert "stain" in r and len(r["stain"]["mean"]) == 3
    store_reference(path, r)
    b2 = load_bundle(path)
    assert b2.meta["reference"]["n"] == len(ref)
    # weights untouched
    import torch

    x = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(b.model(x), b2.model(x))


def test_per_source_metrics_unknown_classes_and_ood_warning(sets, tmp_path):
    base, ref, normal, inverted, path = sets
    b = load_bundle(path)
    if "reference" not in b.meta:
        store_reference(path, fit_reference(b, ref, um_per_px=0.1))
        b = load_bundle(path)
    res = evaluate_sets(b, [normal, inverted], n_boot=50)
    assert set(res.per_source) == {"normal", "inverted", "ALL"}
    n = res.per_source["normal"]
    assert n["n_scored"] == 15 and n["n_unknown_class"] == 5 and n["unknown_classes"] == {"BAS": 5}
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0 <= n[key]["value"] <= 1
    assert res.per_source["ALL"]["n_scored"] == 30
    # the shifted set is flagged, the in-distribution one is not
    assert res.ood["inverted"]["warning"] and "out of distribution" in res.ood["inverted"]["warning"]
    assert res.ood["inverted"]["fraction_beyond_reference_q95"] > 0.5
    assert res.ood["normal"]["warning"] is None
    assert any("inverted" in w for w in res.warnings)
    # scale: PBC states no µm/px, so it is estimated per source from the red cells (~0.1 µm/px)
    assert res.scale["normal"]["origin"] == ["estimated"]
    assert 0.08 < res.scale["normal"]["um_per_px_median"] < 0.12
    files = write_outputs(res, tmp_path / "out")
    summary = json.loads(files["evaluate.json"].read_text())
    assert summary["per_source"]["inverted"]["n_scored"] == 15
    pc = pd.read_csv(files["per_class.csv"])
    assert {"source", "class", "sensitivity", "precision"} <= set(pc.columns)
    assert set(pc["class"]) <= set(MODEL_CLASSES)
    from leukoscope.evaluate.metrics import read_predictions

    pred = read_predictions(files["predictions.csv"])
    assert len(pred) == 35 and {"source", "known", "max_prob", "ood_score"} <= set(pred.columns)


def test_stain_normalisation_uses_the_stored_reference(sets):
    base, ref, normal, _, path = sets
    b = load_bundle(path)
    if "reference" not in b.meta:
        store_reference(path, fit_reference(b, ref, um_per_px=0.1))
        b = load_bundle(path)
    res = evaluate_sets(b, normal, stain_normalize=True, n_boot=0, estimate_scale="off")
    assert res.settings["stain_normalize"] and res.per_source["normal"]["n_scored"] == 15
    plain = tiny_bundle(base / "plain.safetensors")
    with pytest.raises(ValueError, match="reference"):
        evaluate_sets(load_bundle(plain), normal, stain_normalize=True, n_boot=0)


def test_group_by_folder_and_validation_split(sets):
    base, ref, normal, _, path = sets
    t = normal.assign(source="x")
    assert set(group_labels(t, "folder")) == {"eosinophil", "lymphocyte", "neutrophil", "basophil"}
    assert set(group_labels(t, "source")) == {"x"}
    with pytest.raises(ValueError):
        group_labels(t, "colour")
    va = validation_table(load_bundle(path), ref)
    assert 0 < len(va) < len(ref) and set(va["label"]) == set(MODEL_CLASSES)


def test_cli_writes_the_three_files_and_prints_the_warning(sets, tmp_path, capsys):
    from leukoscope.cli.main import main

    base, _, _, _, path = sets
    rc = main(["evaluate", str(path), str(base / "data"), "--out", str(tmp_path / "o"),
               "--fit-reference", str(base / "reference"), "--bootstrap", "20", "--um-per-px", "0.1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "normal" in out and "inverted" in out and "WARNING: 'inverted'" in out
    assert "WARNING: 'normal'" not in out
    for f in ("evaluate.json", "per_class.csv", "predictions.csv"):
        assert (tmp_path / "o" / f).exists()
