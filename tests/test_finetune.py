"""Fine-tuning knobs: init_from with a grown head, head warm-up, body learning rate, frozen BatchNorm, balance_by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukoscope.models.bundle import load_bundle, make_meta, save_bundle
from leukoscope.models.heads import classifier_layer, grow_head, head_parameter_names, split_parameters
from leukoscope.models.registry import create_model
from leukoscope.train import TrainConfig, train
from leukoscope.train.balance import balanced_epoch
from leukoscope.train.trainer import Trainer

SMALL = {"widths": [8, 16], "hidden": 16, "dropout": 0.0}
TINY = dict(model="plain_cnn", input_size=32, epochs=1, per_class=6, batch_size=8, lr=3e-3, threads="1", workers=1,
            model_kwargs=SMALL, ood_reference=False, bf16="off")


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    from leukoscope.data import read_dataset
    from leukoscope.synth import write_cells

    root = write_cells(tmp_path_factory.mktemp("cells"), per_class=6, size=48, classes=["LYT", "MON", "NGS"])
    return read_dataset(root)


@pytest.fixture(scope="module")
def two_class_bundle(tmp_path_factory):
    torch.manual_seed(1)
    model = create_model("plain_cnn", num_classes=2, **SMALL).eval()
    meta = make_meta(classes=("LYT", "NGS"), model="plain_cnn", input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                     um_per_px=None, temperature=1.0, config={"model_kwargs": SMALL})
    return save_bundle(model, meta, tmp_path_factory.mktemp("b") / "model.safetensors")


def started(cells, tmp_path, **kw) -> Trainer:
    """A Trainer with data and model ready (no epoch run yet)."""
    t = Trainer(cells.table, tmp_path / "run", TrainConfig(**{**TINY, **kw}), progress=False, log=quiet)
    t.prepare_data()
    t.build_model()
    t.resume_or_start()
    return t


def body_state(model) -> dict:
    head = head_parameter_names(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in head}


# --------------------------------------------------------------------------- heads


def test_grow_head_keeps_old_rows_and_adds_new_ones():
    torch.manual_seed(0)
    m = create_model("plain_cnn", num_classes=2, **SMALL).eval()
    x = torch.rand(3, 3, 32, 32)
    before = m(x)
    grow_head(m, ["LYT", "NGS"], ["LYT", "MON", "NGS"])
    after = m(x)
    assert classifier_layer(m).out_features == 3 and after.shape == (3, 3)
    assert torch.equal(after[:, [0, 2]], before)
    assert not torch.allclose(after[:, 1], before[:, 0])
    body, head = split_parameters(m)
    assert [p.shape for p in head] == [(3, 16), (3,)] and len(body) > 2


def test_init_from_grows_the_head_and_keeps_the_old_logits_before_training(cells, two_class_bundle, tmp_path):
    res = train(cells.table, tmp_path / "ft", TrainConfig(**{**TINY, "epochs": 0}, init_from=str(two_class_bundle)),
                progress=False, log=quiet)
    new, old = load_bundle(res.bundle_path), load_bundle(two_class_bundle)
    assert new.classes == ("LYT", "MON", "NGS") and old.classes == ("LYT", "NGS")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        z_new, z_old = new.model(x), old.model(x)
    assert torch.equal(z_new[:, [0, 2]], z_old)
    assert res.meta["config"]["init_from"] == str(two_class_bundle)


def test_init_from_warns_when_the_bundle_saw_other_inputs(cells, two_class_bundle, tmp_path):
    with pytest.warns(RuntimeWarning, match=r"white_balance False -> True"):
        train(cells.table, tmp_path / "wb", TrainConfig(**{**TINY, "epochs": 0}, init_from=str(two_class_bundle),
                                                        white_balance=True), progress=False, log=quiet)


def test_init_from_a_bundle_of_another_model_is_an_error(cells, two_class_bundle, tmp_path):
    with pytest.raises(ValueError, match="holds model 'plain_cnn', the config says 'resnet18'"):
        train(cells.table, tmp_path / "x", TrainConfig(**{**TINY, "model": "resnet18"}, init_from=str(two_class_bundle)),
              progress=False, log=quiet)


# --------------------------------------------------------------------------- warm-up, learning rates, BatchNorm


def test_head_warmup_epoch_leaves_the_body_unchanged(cells, tmp_path):
    t = started(cells, tmp_path, head_warmup_epochs=1)
    body0, head0 = body_state(t.model), classifier_layer(t.model).weight.detach().clone()
    t.run_epochs()
    assert all(torch.equal(v, body_state(t.model)[k]) for k, v in body0.items())  # weights and BN statistics
    assert not torch.equal(head0, classifier_layer(t.model).weight)
    assert all(p.requires_grad for p in t.model.parameters())  # unfrozen after the run

    plain = started(cells, tmp_path / "plain")
    body0 = body_state(plain.model)
    plain.run_epochs()
    assert any(not torch.equal(v, body_state(plain.model)[k]) for k, v in body0.items())


def test_body_lr_scale_gives_the_body_its_own_parameter_group(cells, tmp_path):
    t = started(cells, tmp_path, body_lr_scale=0.1, lr=0.01)
    head, body = t.optimizer.param_groups
    assert head["initial_lr"] == pytest.approx(0.01) and body["initial_lr"] == pytest.approx(0.001)
    assert {id(p) for p in head["params"]} == {id(p) for p in classifier_layer(t.model).parameters()}
    assert len(head["params"]) + len(body["params"]) == len(list(t.model.parameters()))
    assert len(started(cells, tmp_path / "one").optimizer.param_groups) == 1  # default: as before


def test_freeze_bn_keeps_the_running_statistics(cells, tmp_path):
    t = started(cells, tmp_path, freeze_bn=True)
    stats = {k: v.clone() for k, v in t.model.state_dict().items() if "running" in k}
    conv = t.model[0].weight.detach().clone()
    t.run_epochs()
    after = t.model.state_dict()
    assert stats and all(torch.equal(v, after[k]) for k, v in stats.items())
    assert not torch.equal(conv, t.model[0].weight)  # the body still learns


# --------------------------------------------------------------------------- balance_by


def test_balance_by_source_class_spreads_each_class_over_its_sources():
    labels = np.array([0] * 10 + [0] * 2 + [1] * 4)
    sources = np.array(["a"] * 10 + ["b"] * 2 + ["a"] * 4)
    idx = balanced_epoch(labels, 10, seed=0, epoch=0, sources=sources)
    pairs = list(zip(sources[idx].tolist(), labels[idx].tolist()))
    assert {p: pairs.count(p) for p in set(pairs)} == {("a", 0): 5, ("b", 0): 5, ("a", 1): 10}
    plain = balanced_epoch(labels, 10, seed=0, epoch=0)
    assert (sources[plain][labels[plain] == 0] == "b").sum() < 5  # by class only, the small lab is drawn less
    odd = balanced_epoch(labels, 11, seed=0, epoch=1, sources=sources)
    assert sorted(np.bincount(labels[odd]).tolist()) == [11, 11]
    assert np.array_equal(odd, balanced_epoch(labels, 11, seed=0, epoch=1, sources=sources))


def test_balance_by_source_class_trains_and_needs_a_source_column(cells, tmp_path):
    table = cells.table.assign(source=["lab1" if i % 2 else "lab2" for i in range(len(cells.table))])
    res = train(table, tmp_path / "src", TrainConfig(**TINY, balance_by="source_class"), progress=False, log=quiet)
    assert res.meta["config"]["balance_by"] == "source_class" and np.isfinite(res.log["train_loss"]).all()
    with pytest.raises(ValueError, match="needs a 'source' column"):
        train(cells.table.drop(columns=["source"], errors="ignore"), tmp_path / "nosrc",
              TrainConfig(**TINY, balance_by="source_class"), progress=False, log=quiet)
