"""Training: augmentation, balancing, the loop (resume, early stop, calibration), presets, cv."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from leukoscope.train import TrainConfig, cross_validate, fit_temperature, preset, train
from leukoscope.train.augment import AugmentConfig, augment_batch
from leukoscope.train.balance import balanced_epoch, shard
from leukoscope.train.loop import ThreadTuner, load_checkpoint, stratified_val_split

TINY = dict(model="plain_cnn", input_size=32, epochs=2, per_class=6, batch_size=8, lr=3e-3, threads="1",
            workers=1, model_kwargs={"widths": [8, 16], "hidden": 16, "dropout": 0.1},
            ood_reference=False)  # one validation image per class: too few (tests/test_train_robust.py fits one)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    from leukoscope.data import read_dataset
    from leukoscope.synth import write_cells

    root = write_cells(tmp_path_factory.mktemp("cells"), per_class=6, size=48, classes=["LYT", "MOB", "MYO", "NGS"])
    return read_dataset(root)


# --------------------------------------------------------------------------- augmentation


def _bordered(n=4, size=40):
    """Light background (220) with a dark disc in the middle: corners must stay light."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 220, np.uint8)
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = (90, 30, 120)
    return torch.from_numpy(np.stack([img] * n))


def test_rotation_fills_corners_from_the_image_not_black():
    x = _bordered(16)
    y = augment_batch(x, torch.Generator().manual_seed(1), AugmentConfig(rotate=True, flip=True))
    assert y.shape == (16, 3, 40, 40) and y.dtype == torch.float32
    corners = torch.stack([y[:, :, :3, :3], y[:, :, :3, -3:], y[:, :, -3:, :3], y[:, :, -3:, -3:]])
    assert corners.min() > 0.8  # background 220/255 = 0.86; black would be 0
    # the cell is still there: the centre stays dark
    assert y[:, :, 18:22, 18:22].mean() < 0.5


def test_augmentation_is_deterministic_under_a_seed_and_varies_across_seeds():
    x = _bordered(4)
    x[:, :5, :, :] = 0  # an asymmetric stripe so that rotations differ
    a = augment_batch(x, torch.Generator().manual_seed(7), AugmentConfig(brightness=0.2, contrast=0.2))
    b = augment_batch(x, torch.Generator().manual_seed(7), AugmentConfig(brightness=0.2, contrast=0.2))
    c = augment_batch(x, torch.Generator().manual_seed(8), AugmentConfig(brightness=0.2, contrast=0.2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_stain_jitter_is_used_when_asked_and_seeded():
    x = _bordered(3)
    cfg = AugmentConfig(rotate=False, flip=False, stain_jitter=0.1)
    a = augment_batch(x, torch.Generator().manual_seed(3), cfg)
    b = augment_batch(x, torch.Generator().manual_seed(3), cfg)
    plain = augment_batch(x, torch.Generator().manual_seed(3), AugmentConfig(rotate=False, flip=False))
    assert torch.equal(a, b) and not torch.allclose(a, plain, atol=1e-3)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_no_augmentation_is_identity():
    x = _bordered(2)
    y = augment_batch(x, torch.Generator().manual_seed(0), AugmentConfig(rotate=False, flip=False))
    assert torch.allclose(y, x.permute(0, 3, 1, 2).float() / 255, atol=1e-5)


# --------------------------------------------------------------------------- balancing


def test_balanced_epoch_gives_target_per_class_and_uses_images_evenly():
    labels = np.array([0] * 3 + [1] * 10 + [2] * 1)
    idx = balanced_epoch(labels, target_per_class=7, seed=0, epoch=3)
    assert np.bincount(labels[idx]).tolist() == [7, 7, 7]
    uses = np.bincount(idx[labels[idx] == 0], minlength=3)[:3]
    assert uses.max() - uses.min() <= 1  # repeated as evenly as possible
    assert len(set(idx[labels[idx] == 1])) == 7  # a big class is subsampled without repeats
    assert np.array_equal(idx, balanced_epoch(labels, 7, seed=0, epoch=3))
    assert not np.array_equal(idx, balanced_epoch(labels, 7, seed=0, epoch=4))


def test_shards_cover_the_epoch():
    idx = np.arange(10)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert {len(p) for p in parts} == {4}
    assert set(np.concatenate(parts)) == set(idx)


def test_validation_split_is_stratified_and_keeps_tiny_classes_for_training():
    labels = np.array([0] * 20 + [1] * 10 + [2] * 2)
    tr, va = stratified_val_split(labels, 0.1, seed=0)
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(labels)


def test_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 4)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=pi) for pi in p])
    t = fit_temperature(z * 3, y)  # logits 3x too confident
    assert 2.5 < t < 3.5


def test_thread_tuner_probes_both_counts_then_keeps_the_faster():
    old = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, period=10, probe=2)
        seen = []
        for k in range(10):
            tuner.before_step()
            seen.append(torch.get_num_threads())
            tuner.after_step(1.0 if torch.get_num_threads() == 2 else 0.1)
        assert seen[:4] == [2, 2, 1, 1] and tuner.choice == 1 and seen[4:] == [1] * 6
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- the loop


def test_train_writes_bundle_config_log_and_metadata(cells, tmp_path):
    from leukoscope.models import load_bundle

    res = train(cells.table, tmp_path / "run", tiny(), progress=False, log=lambda s: None)
    out = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "log.csv", "metadata.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint.pt").exists()
    log = pd.read_csv(out / "log.csv")
    assert log.columns.tolist() == ["epoch", "train_loss", "val_loss", "val_balanced_acc", "lr", "images_per_s",
                                    "seconds"]
    assert log["epoch"].tolist() == [1, 2]
    b = load_bundle(res.bundle_path)
    assert b.classes == ("LYT", "MOB", "MYO", "NGS")
    assert b.meta["temperature"] > 0 and "val_balanced_accuracy" in b.meta["metrics"]
    assert b.meta["config"]["model_kwargs"]["widths"] == [8, 16]
    assert b.meta["fingerprint"] and "not for diagnostic use" in b.meta["intended_use"]
    assert b.meta["um_per_px"] is not None  # LMU-layout data has a known scale
    # plain_cnn trains in bf16 on a CPU that has it: bf16 inference decided on the validation images, with
    # the guard and the evidence recorded
    import torch

    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        chk = b.meta["bf16_check"]
        assert b.meta["bf16_guard"] == chk["bf16_guard"] >= 0.01 and chk["n"] == b.meta["metrics"]["n_val"]
        assert b.meta["inference_bf16"] == (chk["inference_bf16"] and chk["max_abs_prob_diff"] < 0.02)
    # a model for which bf16 does not pay on the CPU (the MobileNets' depthwise convolutions) stays fp32
    fp32 = train(cells.table, tmp_path / "fp32", tiny(bf16="off"), progress=False, log=lambda s: None)
    assert fp32.meta["inference_bf16"] is False and "bf16_check" not in fp32.meta
    # a finished run is not retrained
    again = train(cells.table, out, tiny(), progress=False, log=lambda s: None)
    assert again.reused
    with pytest.raises(ValueError, match="different config"):
        train(cells.table, out, tiny(epochs=5), progress=False, log=lambda s: None)


def test_interrupted_run_resumes_to_the_same_final_state(cells, tmp_path):
    cfg = tiny(epochs=3)
    full = train(cells.table, tmp_path / "full", cfg, progress=False, log=lambda s: None)

    def crash(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cells.table, tmp_path / "cut", cfg, progress=False, log=lambda s: None, on_epoch_end=crash)
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ck["epoch"] == 1 and not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train(cells.table, tmp_path / "cut", cfg, progress=False, log=lambda s: None)
    assert resumed.resumed_from == 1
    assert resumed.log["epoch"].tolist() == [1, 2, 3]
    from safetensors.torch import load_file

    a, b = load_file(full.bundle_path), load_file(resumed.bundle_path)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert np.allclose(full.log["train_loss"], resumed.log["train_loss"], atol=1e-5)


def test_early_stopping_on_validation_loss(cells, tmp_path):
    res = train(cells.table, tmp_path / "es", tiny(epochs=30, patience=1, lr=0.5), progress=False,
                log=lambda s: None)
    m = res.metrics
    assert m["stopped_early"] and m["epochs_run"] < 30 and m["best_epoch"] == m["epochs_run"] - 1


@pytest.mark.slow
def test_paper_preset_runs_an_optimisation_step_at_400px(cells, tmp_path):
    cfg = preset("paper", epochs=1, per_class=1, batch_size=2, threads="auto", workers=1)
    assert cfg.model == "resnext50_32x4d" and cfg.resolved().input_size == 400 and cfg.stain_jitter == 0
    two = cells.table[cells.table["label"].isin(["LYT", "MYO"])]
    res = train(two, tmp_path / "paper", cfg, progress=False, log=lambda s: None)
    assert res.log["epoch"].tolist() == [1]
    assert res.meta["input_size"] == 400 and res.meta["model"] == "resnext50_32x4d"
    assert res.meta["classes"] == ["LYT", "MYO"]


def test_unknown_model_lists_the_known_ones(cells, tmp_path):
    with pytest.raises(ValueError, match="known models: .*resnext50_32x4d"):
        train(cells.table, tmp_path / "x", tiny(model="resnet1000"), progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_on_cpu(cells, tmp_path):
    import torch.multiprocessing as mp

    table = tmp_path / "t.pkl"
    cells.table.to_pickle(table)
    mp.start_processes(_ddp_worker, args=(2, str(table), str(tmp_path / "ddp")), nprocs=2, start_method="spawn")
    from leukoscope.models import load_bundle

    b = load_bundle(tmp_path / "ddp" / "model.safetensors")
    assert len(b.classes) == 4


def _ddp_worker(rank, world, table, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("LEUKOSCOPE_TEST_PORT", "29517"))
    torch.set_num_threads(1)
    train(pd.read_pickle(table), out, tiny(epochs=1, device="cpu"), progress=False, log=lambda s: None)
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- cross-validation


def test_cv_predicts_every_image_exactly_once_and_resumes(cells, tmp_path):
    out = tmp_path / "cv"
    logs = []
    res = cross_validate(cells.table, out, tiny(), folds=3, progress=False, log=logs.append)
    preds = pd.read_csv(out / "predictions.csv")
    assert preds.columns.tolist() == ["path", "label", "fold", "pred", "prob_LYT", "prob_MOB", "prob_MYO", "prob_NGS"]
    assert sorted(preds["path"]) == sorted(cells.table["path"]) and not preds["path"].duplicated().any()
    split = pd.read_csv(out / "split.csv")
    assert (preds.set_index("path")["fold"] == split.set_index("path")["fold"]).all()
    assert np.allclose(preds.filter(like="prob_").sum(axis=1), 1)
    for k in range(3):
        assert (out / f"fold{k}" / "model.safetensors").exists()
    cfg = pd.read_json(out / "config.json", typ="series")
    assert cfg["folds"] == 3 and cfg["data_fingerprint"]
    assert 0 <= res.summary["balanced_accuracy"] <= 1
    # running again keeps the finished folds
    logs.clear()
    cross_validate(cells.table, out, tiny(), folds=3, progress=False, log=logs.append)
    assert sum("finished earlier" in line for line in logs) == 3


def test_cv_drops_a_class_too_small_for_the_folds(cells, tmp_path):
    from leukoscope.train.cv import SmallClassWarning

    t = cells.table.copy()
    t.loc[t.index[:2], "label"] = "EOS"   # 2 EOS images (were LYT) < 3 folds
    with pytest.warns(SmallClassWarning, match="EOS"):
        res = cross_validate(t, tmp_path / "cv", tiny(epochs=1), folds=3, progress=False, log=lambda s: None)
    assert "EOS" not in set(res.predictions["label"]) and "prob_EOS" not in res.predictions
