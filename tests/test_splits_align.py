"""One split alignment for every command: relative split paths, fold tables, train and evaluate agree."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from leukoscope.cli.main import main
from leukoscope.data import align_split, fold_tables, make_split, read_dataset, write_split
from leukoscope.models.bundle import make_meta, save_bundle
from leukoscope.models.registry import create_model

SMALL = {"widths": [8, 16], "hidden": 16, "dropout": 0.0}


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    from leukoscope.synth import write_cells

    root = write_cells(tmp_path_factory.mktemp("cells"), per_class=5, size=48, classes=["LYT", "NGS"])
    return read_dataset(root)


@pytest.fixture
def relative_split(cells, tmp_path):
    """A split file in another folder whose paths are relative to that folder."""
    folder = tmp_path / "splits"
    folder.mkdir()
    sp = make_split(cells.table, folds=5, seed=0)
    sp["path"] = [os.path.relpath(p, folder) for p in sp["path"]]
    path = write_split(sp, folder / "split.csv")
    assert not any(os.path.isabs(p) for p in pd.read_csv(path)["path"])
    return path


def test_align_split_resolves_relative_paths_and_keeps_the_table(cells, relative_split):
    t = align_split(cells.table, relative_split)
    assert len(t) == len(cells.table) and list(t.columns) == list(cells.table.columns) + ["fold"]
    assert list(t["path"]) == [str(p) for p in cells.table["path"]]
    assert sorted(t["fold"].value_counts().tolist()) == [2] * 5
    train, test = fold_tables(cells.table, relative_split, 0)
    assert len(train) == 8 and len(test) == 2 and set(test["fold"]) == {0} and 0 not in set(train["fold"])
    assert set(train["path"]).isdisjoint(test["path"])
    with pytest.raises(ValueError, match=r"fold 9 is not in the split of .*split.csv \(folds: \[0, 1, 2, 3, 4\]\)"):
        fold_tables(cells.table, relative_split, 9)


def test_a_split_of_another_dataset_is_an_error_naming_the_file(cells, tmp_path):
    other = pd.DataFrame({"path": ["x/a.png", "x/b.png"], "label": ["LYT", "NGS"], "fold": [0, 1]})
    path = write_split(other, tmp_path / "other.csv")
    with pytest.raises(ValueError, match="other.csv: the split lists none of the dataset's images"):
        align_split(cells.table, path)


def test_cli_evaluate_takes_a_split_file_with_relative_paths(cells, relative_split, tmp_path):
    import torch

    torch.manual_seed(0)
    model = create_model("plain_cnn", num_classes=2, **SMALL).eval()
    meta = make_meta(classes=("LYT", "NGS"), model="plain_cnn", input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                     um_per_px=None, temperature=1.0, config={"model_kwargs": SMALL})
    bundle = save_bundle(model, meta, tmp_path / "model.safetensors")
    out = tmp_path / "ev"
    assert main(["evaluate", str(bundle), str(cells.root), "--split", str(relative_split), "--fold", "1",
                 "--estimate-scale", "off", "--bootstrap", "0", "--out", str(out)]) == 0
    pred = pd.read_csv(out / "predictions.csv")
    _, want = fold_tables(cells.table, relative_split, 1)
    assert sorted(pred["path"]) == sorted(want["path"]) and len(pred) == 2
