"""Where the review station meets a new lab: a signed review's export-labels folder is the lab's
training data for ``adapt`` (DESIGN.md's loop: screen -> review -> export-labels -> adapt)."""

from __future__ import annotations

import hashlib

import numpy as np

from leukoscope.data import read_dataset
from leukoscope.models.bundle import load_bundle
from leukoscope.predict import predict_paths
from leukoscope.review.export import export_labels
from leukoscope.train.adapt import adapt
from leukoscope.train.loop import table_fingerprint
from review_helpers import TINY_CLASSES, run, store  # noqa: F401 (fixtures)


def test_a_signed_review_teaches_the_model_the_labs_cells_and_a_class_it_lacked(run, store, tmp_path):
    cells = store.cells()
    assert len(cells) >= 6
    # the reviewer keeps the model's calls, except three cells that are eosinophils (a class the model lacks)
    # and one that is not a leukocyte
    eos = [c["id"] for c in cells[:3]]
    for c in cells:
        label = "EOS" if c["id"] in eos else ("artefact" if c["id"] == cells[3]["id"] else c["model_pred"])
        if c["label"] != label:
            store.reclassify(c["id"], label, "Dr A", c["version"])
    store.mark_seen(c["id"] for c in store.cells())
    store.sign_off("Dr A", "S-7", "")
    exported = export_labels(store, tmp_path / "lab")
    assert exported["left_out"]["artefact"] == 1

    lab = read_dataset(tmp_path / "lab").table
    assert len(lab) == len(cells) - 1 and (lab["label"] == "EOS").sum() == 3
    replay = read_dataset(run["root"] / "cells").table
    res = adapt(run["model"], lab, tmp_path / "adapted", replay_table=replay, replay_per_class=4, epochs=1,
                per_class=4, overrides={"threads": "1", "workers": 1, "batch_size": 8}, log=lambda s: None)

    adapted = load_bundle(res.bundle_path)
    assert list(adapted.classes) == sorted(set(TINY_CLASSES) | {"EOS"})        # the head grew, old classes kept
    lin = res.lineage
    assert lin["mode"] == "labelled"
    assert lin["parent_sha256"] == hashlib.sha256(run["model"].read_bytes()).hexdigest()
    assert lin["adaptation_fingerprint"] == table_fingerprint(res.lab_used)
    assert lin["k_per_class"] == lab["label"].value_counts().to_dict()         # every reviewed cell was used
    assert lin["replay"]["n"] == len(res.replay_used) > 0
    # the lab's cells carry the smear's physical scale through the export into training
    assert np.allclose(lab["um_per_px"].astype(float), cells[0]["um_per_px"])
    # and the adapted model predicts the exported cells, EOS among its possible calls
    pred = predict_paths(adapted, [tmp_path / "lab" / "cells"]).table
    assert len(pred) == len(lab) and "prob_EOS" in pred
