"""Adapting a model to a new lab (labelled with replay, K per class, new classes; AdaBN), multi-lab training,
the synthetic second lab, and the pretrained setting."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from leukoscope.cli.main import main
from leukoscope.data import read_dataset
from leukoscope.data.readers import read_datasets
from leukoscope.evaluate.calibration import fit_temperature
from leukoscope.models.bundle import load_bundle, read_meta
from leukoscope.models.pipeline import normalize
from leukoscope.models.pretrained import SOURCES, file_sha256
from leukoscope.synth import make_cell, write_cells
from leukoscope.train import TrainConfig, Trainer, preset, train
from leukoscope.train.adapt import adapt, take_k_per_class
from leukoscope.train.trainer import initial_model

SMALL = {"widths": [8, 16, 32], "hidden": 32, "dropout": 0.0}
PARENT = dict(model="plain_cnn", input_size=32, epochs=6, per_class=60, batch_size=16, lr=3e-3, threads="1",
              workers=1, model_kwargs=SMALL, ood_reference=False, bf16="off", brightness=0.1, contrast=0.1)
FAST = {"threads": "1", "workers": 1}
LAB_A_CLASSES = ["NGS", "LYT", "EOS"]


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    """Lab A (3 classes, LMU layout) and lab B (another stain and scale, a 4th class MYO, labels.csv)."""
    root = tmp_path_factory.mktemp("labs")
    a = write_cells(root / "A", per_class=30, size=48, classes=LAB_A_CLASSES)
    b = write_cells(root / "B", per_class=24, size=48, classes=LAB_A_CLASSES + ["MYO"], lab="B")
    return a, b


@pytest.fixture(scope="module")
def parent(labs, tmp_path_factory):
    """A small model trained on lab A only."""
    res = train(read_dataset(labs[0]).table, tmp_path_factory.mktemp("parent") / "run", TrainConfig(**PARENT),
                progress=False, log=quiet)
    return res.bundle_path


@pytest.fixture(scope="module")
def adapted(labs, parent, tmp_path_factory):
    """``parent`` adapted to lab B with K = 10 per class, replaying lab A."""
    b = read_dataset(labs[1]).table
    res = adapt(parent, b, tmp_path_factory.mktemp("adapted") / "run", replay_table=read_dataset(labs[0]).table,
                k_per_class=10, overrides=FAST, log=quiet)
    return res, b


def accuracy(bundle_path, table: pd.DataFrame) -> float:
    bundle = load_bundle(bundle_path)
    p = bundle.predict_proba(list(table["path"]), table["um_per_px"].tolist())
    return float((np.array(bundle.classes)[p.argmax(1)] == table["label"].to_numpy()).mean())


# --------------------------------------------------------------------------- labelled adaptation


def test_adapt_adds_the_lab_class_keeps_the_old_ones_and_records_lineage(adapted, parent):
    res, _ = adapted
    meta = read_meta(res.bundle_path)
    assert meta["classes"] == ["EOS", "LYT", "MYO", "NGS"]
    lin = meta["lineage"]
    assert lin["mode"] == "labelled"
    assert lin["parent_sha256"] == file_sha256(parent)
    assert lin["parent_model"] == "plain_cnn"
    assert lin["k_per_class"] == {"NGS": 10, "EOS": 10, "LYT": 10, "MYO": 10}
    assert lin["new_classes"] == ["MYO"]
    assert lin["replay"]["n"] == 90 and len(lin["replay"]["fingerprint"]) == 64
    assert len(lin["adaptation_fingerprint"]) == 64 and lin["adaptation_fingerprint"] != lin["replay"]["fingerprint"]
    assert lin["date"]
    assert meta["config"]["init_from"] == str(parent)


def test_k_per_class_is_honoured_and_validation_comes_from_the_lab_only(adapted):
    res, b = adapted
    assert res.lab_used["label"].value_counts().to_dict() == {"NGS": 10, "EOS": 10, "LYT": 10, "MYO": 10}
    assert set(res.lab_used["path"]) <= set(b["path"])
    assert len(res.validation_paths) == 8  # 20 % of 10 per class
    assert set(res.validation_paths) <= set(res.lab_used["path"])
    assert not set(res.validation_paths) & set(res.replay_used["path"])
    assert res.lineage["validation"] == {"n": 8, "sources": ["synth_lab_B"]}


def test_temperature_is_refitted_on_the_lab_validation_cells(adapted):
    res, _ = adapted
    bundle = load_bundle(res.bundle_path)
    val = res.lab_used.set_index("path").loc[res.validation_paths]
    z = bundle.logits(list(val.index), val["um_per_px"].tolist())
    y = np.array([bundle.classes.index(c) for c in val["label"]])
    assert bundle.temperature == pytest.approx(fit_temperature(z, y), rel=1e-3)


def test_adaptation_improves_the_new_lab_and_keeps_the_first(adapted, parent, labs):
    res, b = adapted
    rest = b[~b["path"].isin(res.lab_used["path"])]
    zero_shot, after = accuracy(parent, rest), accuracy(res.bundle_path, rest)
    assert zero_shot < 0.5, zero_shot                  # lab B's stain and scale fool the lab-A model
    assert after >= zero_shot + 0.2, (zero_shot, after)
    assert accuracy(res.bundle_path, read_dataset(labs[0]).table) >= 0.8  # lab A not forgotten


def test_adapt_without_replay_warns_and_keeps_the_parent_classes(labs, parent, tmp_path):
    b = read_dataset(labs[1]).table
    b = b[b["label"].isin(["NGS", "MYO"])]
    with pytest.warns(RuntimeWarning, match="forgetting"):
        res = adapt(parent, b, tmp_path / "run", k_per_class=5, epochs=1, overrides=FAST, log=quiet)
    assert res.meta["classes"] == ["EOS", "LYT", "MYO", "NGS"]
    assert res.lineage["replay"] is None and res.lineage["k_per_class"] == {"NGS": 5, "MYO": 5}
    assert res.lineage["validation"]["sources"] == ["synth_lab_B"]
    with pytest.raises(ValueError, match="already holds a model"):
        adapt(parent, b, tmp_path / "run", log=quiet)


def test_adapt_on_two_cells_per_class_keeps_the_parent_temperature(labs, parent, tmp_path):
    b = read_dataset(labs[1]).table
    res = adapt(parent, b, tmp_path / "k2", replay_table=read_dataset(labs[0]).table, k_per_class=2, epochs=1,
                overrides=FAST, log=quiet)
    assert res.lineage["validation"]["n"] == 0
    assert res.meta["temperature"] == read_meta(parent)["temperature"] == load_bundle(res.bundle_path).temperature


def test_adapt_refuses_lab_cells_that_are_in_the_replay(labs, parent, tmp_path):
    a = read_dataset(labs[0]).table
    with pytest.raises(ValueError, match="both in the lab's data and in the replayed"):
        adapt(parent, a, tmp_path / "run", replay_table=a, log=quiet)


def test_take_k_per_class_is_seeded_and_capped():
    t = pd.DataFrame({"path": [f"{i}.png" for i in range(12)], "label": ["NGS"] * 8 + ["LYT"] * 4})
    k = take_k_per_class(t, 5, seed=3)
    assert k["label"].value_counts().to_dict() == {"NGS": 5, "LYT": 4}
    assert k.equals(take_k_per_class(t, 5, seed=3)) and not k.equals(take_k_per_class(t, 5, seed=4))
    with pytest.raises(ValueError, match="positive integer"):
        take_k_per_class(t, 0)


def test_cli_adapt_end_to_end(labs, parent, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["adapt", str(parent), str(labs[1]), "--replay", str(labs[0]), "--k", "3", "--epochs", "1",
                 "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "EOS 3, LYT 3, MYO 3, NGS 3" in printed and "replayed 90" in printed
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["lineage"]["k_per_class"] == {"NGS": 3, "EOS": 3, "LYT": 3, "MYO": 3}
    assert len(load_bundle(out).classes) == 4


# --------------------------------------------------------------------------- unlabelled (AdaBN)


def test_unlabelled_adabn_sets_batchnorm_statistics_to_the_lab(labs, parent, tmp_path):
    paths = sorted(str(p) for p in labs[1].rglob("*.tiff"))[:40]  # one batch: the running mean is the exact mean
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for p in paths:
        (folder / p.split("/")[-1]).symlink_to(p)
    out = tmp_path / "adabn"
    assert main(["adapt", str(parent), str(folder), "--unlabelled", "--out", str(out), "--no-progress"]) == 0
    old, new = load_bundle(parent), load_bundle(out)
    assert new.meta["lineage"]["mode"] == "unlabelled" and new.meta["lineage"]["n_lab"] == 40
    x = old.prepare(sorted(str(p) for p in folder.iterdir()))
    with torch.no_grad():
        first_conv = old.model[0](normalize(torch.as_tensor(x), old.mean, old.std))
    assert torch.allclose(new.model[1].running_mean, first_conv.mean((0, 2, 3)), atol=1e-4)
    assert not torch.allclose(old.model[1].running_mean, new.model[1].running_mean, atol=1e-3)
    for k, v in old.model.state_dict().items():  # weights unchanged; only BatchNorm statistics moved
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, new.model.state_dict()[k]), k
    assert not np.allclose(old.predict_proba_prepared(x[:5]), new.predict_proba_prepared(x[:5]))


def test_adapt_um_per_px_reaches_the_scale_policy(labs, parent, tmp_path):
    paths = sorted(str(p) for p in labs[1].rglob("*.tiff"))[:40]
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for p in paths:
        (folder / p.split("/")[-1]).symlink_to(p)
    out = tmp_path / "adabn"
    assert main(["adapt", str(parent), str(folder), "--unlabelled", "--um-per-px", "0.2", "--out", str(out),
                 "--no-progress"]) == 0
    old, new = load_bundle(parent), load_bundle(out)
    assert old.um_per_px and new.meta["lineage"]["lab_scale"]["sources"]["lab"]["um_per_px"] == 0.2
    files = sorted(str(p) for p in folder.iterdir())
    with torch.no_grad():
        conv = [old.model[0](normalize(torch.as_tensor(old.prepare(files, um)), old.mean, old.std)).mean((0, 2, 3))
                for um in ([0.2] * len(files), None)]
    assert torch.allclose(new.model[1].running_mean, conv[0], atol=1e-4)  # prepared at 0.2 µm/px
    assert not torch.allclose(new.model[1].running_mean, conv[1], atol=1e-3)  # not resized as they are
    labelled = tmp_path / "labelled"
    assert main(["adapt", str(parent), str(labs[1]), "--k", "2", "--epochs", "1", "--threads", "1",
                 "--um-per-px", "0.2", "--out", str(labelled), "--no-progress"]) == 0
    assert read_meta(labelled)["lineage"]["lab_scale"]["synth_lab_B"]["um_per_px"] == 0.2


# --------------------------------------------------------------------------- multi-lab training


def test_read_datasets_gives_each_lab_its_source_and_refuses_an_image_twice(labs):
    ds = read_datasets(labs)
    assert ds.table.groupby("source").size().to_dict() == {"lmu": 90, "synth_lab_B": 96}
    with pytest.raises(ValueError, match="the same image is in two datasets"):
        read_datasets([labs[0], labs[0]])


def test_read_datasets_keeps_same_named_sources_apart(tmp_path):
    a = write_cells(tmp_path / "one", per_class=2, size=32, classes=["NGS"])
    b = write_cells(tmp_path / "two", per_class=2, size=32, classes=["NGS"], seed=1)
    assert sorted(set(read_datasets([a, b]).table["source"])) == ["one:lmu", "two:lmu"]


def test_cli_train_on_two_labs_balances_by_source_and_class(labs, tmp_path, capsys):
    out = tmp_path / "multi"
    assert main(["train", str(labs[0]), str(labs[1]), "--preset", "fast", "--model", "plain_cnn", "--input-size", "32",
                 "--epochs", "1", "--per-class", "4", "--threads", "1", "--workers", "1", "--no-ood-reference",
                 "--bf16", "off", "--out", str(out), "--no-progress"]) == 0
    assert "epochs balanced over (source, class)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["balance_by"] == "source_class"


# --------------------------------------------------------------------------- the synthetic second lab


def test_lab_a_is_the_default_look_and_lab_b_another(tmp_path):
    assert np.array_equal(make_cell("LYT", 2, 48), make_cell("LYT", 2, 48, lab="A"))
    a, b = make_cell("LYT", 2, 48).astype(float), make_cell("LYT", 2, 48, lab="B").astype(float)
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() > 5  # another colour
    with pytest.raises(ValueError, match="unknown synthetic lab"):
        make_cell("LYT", 2, 48, lab="Z")
    root = write_cells(tmp_path / "b", per_class=2, size=32, classes=["NGS"], lab="B")
    t = read_dataset(root).table
    assert set(t["source"]) == {"synth_lab_B"} and t["um_per_px"].isna().all()


# --------------------------------------------------------------------------- pretrained


def test_pretrained_run_records_its_weights_and_uses_their_normalisation(labs, tmp_path):
    cfg = TrainConfig(model="efficientnet_lite0", pretrained=True, input_size=32, epochs=1, per_class=2, batch_size=8,
                      threads="1", workers=1, ood_reference=False, bf16="off", val_fraction=0.0)
    t = Trainer(read_dataset(labs[0]).table, tmp_path / "run", cfg, progress=False, log=quiet)
    res = t.fit()
    src = SOURCES["efficientnet_lite0"]
    assert res.meta["pretrained"]["sha256"] == src.sha256 and res.meta["pretrained"]["package"] == src.package
    assert res.meta["mean"] == list(src.mean) and res.meta["std"] == list(src.std)
    scratch = TrainConfig(**{**PARENT, "epochs": 1, "per_class": 2})
    assert train(read_dataset(labs[0]).table, tmp_path / "s", scratch, progress=False, log=quiet).meta["pretrained"] is None


def test_pretrained_preset_and_schedule_defaults():
    c = preset("pretrained")
    assert (c.model, c.pretrained, c.head_warmup_epochs, c.body_lr_scale, c.freeze_bn) == \
        ("mobilenet_v2", True, 1, 0.3, False)
    assert 160 <= c.input_size <= 224 and c.white_balance and c.scale == "estimate"
    assert preset("robust", model="mobilenet_v2", pretrained=True, body_lr_scale=1.0).body_lr_scale == 1.0
    assert preset("robust").head_warmup_epochs == 0
    with pytest.raises(ValueError, match="has no pretrained weights"):
        initial_model(TrainConfig(model="plain_cnn", pretrained=True).resolved(), ["NGS"], quiet)
