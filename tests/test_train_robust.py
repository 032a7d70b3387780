"""Cross-lab measures in the product's training path: colour jitter fields, the training images'
physical scale (stated or estimated from red cells), the OOD reference fitted at training time,
the ``robust`` preset and its command-line options."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from leukoscope.train.augment import colour_augment
from leukoscope.train import TrainConfig, cross_validate, preset, train
from leukoscope.train.augment import AugmentConfig, augment_batch
from leukoscope.train.config import config_diff as _config_diff
from leukoscope.train.loop import resolve_training_scale

from conftest import tiny_config

COLOUR = ("saturation", "gamma", "blur")
tiny = tiny_config  # conftest's tiny training config; the dataset is conftest's ``cells``


def quiet(_):
    pass


@pytest.fixture(scope="module")
def unscaled(tmp_path_factory):
    """Synthetic crops of two sources with a known µm/px each (29 µm fields at 96 and 64 px), the table
    stating none: the red-cell ruler has to find 29/96 and 29/64."""
    from leukoscope.data import read_dataset
    from leukoscope.synth import write_cells

    parts = []
    for source, size in (("a", 96), ("b", 64)):
        root = write_cells(tmp_path_factory.mktemp(source), per_class=6, size=size, seed=1,
                           classes=["LYT", "MOB", "MYO", "NGS"])
        parts.append(read_dataset(root).table[["path", "label"]].assign(source=source))
    return pd.concat(parts, ignore_index=True).assign(um_per_px=np.nan)


def _cell_batch(n=8, size=40):
    """A light background with a purple disc and an asymmetric stripe: every jitter changes it."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 220, np.uint8)
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = (90, 30, 120)
    img[:5] = (200, 120, 130)
    return torch.from_numpy(np.stack([img] * n))


def _aug(x, seed, **kw):
    return augment_batch(x, torch.Generator().manual_seed(seed), AugmentConfig(brightness=0.1, contrast=0.1, **kw))


# --------------------------------------------------------------------------- colour jitter


@pytest.mark.parametrize("field,amount", [("saturation", 0.25), ("gamma", 0.25), ("blur", 1.0)])
def test_colour_jitter_field_changes_the_batch_only_when_nonzero_and_is_seeded(field, amount):
    x = _cell_batch()
    plain = _aug(x, 3)
    assert torch.equal(_aug(x, 3, **{field: 0.0}), plain)  # zero: the same draws, the same batch
    a, b, c = _aug(x, 3, **{field: amount}), _aug(x, 3, **{field: amount}), _aug(x, 4, **{field: amount})
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, plain, atol=1e-3)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_colour_jitter_follows_the_stain_jitter_in_one_generator_stream():
    """Rotation/flip, brightness/contrast, HED, then saturation, gamma, blur: the order the
    robustness measurement used (colour_augment after the trainer's own augmentation)."""
    x = _cell_batch()
    colour = dict(saturation=0.25, gamma=0.25, blur=1.0)
    got = _aug(x, 5, stain_jitter=0.1, **colour)
    g = torch.Generator().manual_seed(5)
    want = augment_batch(x, g, AugmentConfig(brightness=0.1, contrast=0.1, stain_jitter=0.1))
    want = colour_augment(want, g, stain=0.0, **colour)
    assert torch.equal(got, want)


def test_paper_and_fast_presets_keep_colour_and_scale_off():
    for name in ("paper", "fast"):
        cfg = preset(name)
        assert [getattr(cfg, f) for f in COLOUR] == [0.0, 0.0, 0.0] and cfg.scale == "stated", name
    assert preset("paper").stain_jitter == 0 and preset("fast").stain_jitter == 0


def test_robust_preset_is_fast_plus_the_cross_lab_measures_and_the_default():
    from leukoscope.train.presets import DEFAULT_PRESET

    robust, fast = preset("robust").resolved(), preset("fast").resolved()
    assert robust.preset == "robust" == DEFAULT_PRESET
    assert (robust.scale, robust.white_balance, robust.stain_jitter, robust.saturation, robust.gamma, robust.blur,
            robust.epochs) == ("estimate", True, 0.1, 0.25, 0.25, 1.0, 18)
    changed = {"preset", "scale", "white_balance", "stain_jitter", "saturation", "gamma", "blur", "epochs"}
    assert {k: v for k, v in robust.to_dict().items() if k not in changed} == \
        {k: v for k, v in fast.to_dict().items() if k not in changed}
    assert robust.brightness == fast.brightness == 0.1 and robust.contrast == fast.contrast == 0.1
    assert preset("robust", scale="stated", blur=0.5).blur == 0.5


def test_cli_options_reach_the_config():
    import argparse

    from leukoscope.cli.train import add_train_options, config_from_args

    p = argparse.ArgumentParser()
    add_train_options(p)
    cfg = config_from_args(p.parse_args(["d", "--preset", "fast", "--saturation", "0.3", "--gamma", "0.2",
                                         "--blur", "1.5", "--scale", "estimate", "--stain-jitter", "0.1"]))
    assert (cfg.saturation, cfg.gamma, cfg.blur, cfg.scale, cfg.stain_jitter, cfg.preset) == \
        (0.3, 0.2, 1.5, "estimate", 0.1, "fast")
    cfg = config_from_args(p.parse_args(["d", "--saturation", "0.1", "--epochs", "3"]))
    assert (cfg.preset, cfg.saturation, cfg.epochs, cfg.gamma) == ("robust", 0.1, 3, 0.25)
    cfg = config_from_args(p.parse_args(["d", "--preset", "robust", "--scale", "stated"]))
    assert cfg.scale == "stated" and cfg.saturation == 0.25
    with pytest.raises(SystemExit):
        p.parse_args(["d", "--scale", "guess"])
    with pytest.raises(ValueError, match="scale must be one of"):
        tiny(scale="guess").resolved()


def test_training_with_colour_jitter_records_it(cells, tmp_path):
    res = train(cells.table, tmp_path / "run", tiny(stain_jitter=0.1, saturation=0.25, gamma=0.25, blur=1.0,
                                                     ood_reference=False), progress=False, log=quiet)
    assert {f: res.meta["config"][f] for f in COLOUR} == {"saturation": 0.25, "gamma": 0.25, "blur": 1.0}
    assert np.isfinite(res.log["train_loss"]).all()


def test_runs_written_before_the_new_fields_are_still_the_same_config():
    new = tiny().to_dict()
    old = {k: v for k, v in new.items() if k not in (*COLOUR, "scale", "ood_reference")}
    assert _config_diff(old, new) == []
    assert _config_diff(old, tiny(blur=1.0).to_dict()) == ["blur: 0.0 -> 1.0"]


# --------------------------------------------------------------------------- physical scale


def test_stated_scale_keeps_todays_behaviour_and_records_it(unscaled, cells, tmp_path):
    t, rec = resolve_training_scale(unscaled, "stated", log=quiet)
    assert t["um_per_px"].isna().all() and rec["estimates"] == {}
    assert rec["sources"]["a"] == {"um_per_px": None, "origin": ["unknown"], "n_images": 24}
    res = train(unscaled, tmp_path / "stated", tiny(ood_reference=False), progress=False, log=quiet)
    assert res.meta["um_per_px"] is None  # resized to the input, as before
    assert res.meta["training_scale"]["scale"] == "stated"
    assert res.meta["training_scale"]["model_um_per_px"] is None
    # an LMU-layout table states its scale: used as is, nothing estimated
    _, rec = resolve_training_scale(cells.table, "estimate", log=quiet)
    assert rec["estimates"] == {} and rec["sources"]["lmu"]["origin"] == ["table"]


def test_estimated_scale_per_source_reaches_the_cache_and_the_metadata(unscaled, tmp_path):
    logs = []
    res = train(unscaled, tmp_path / "est", tiny(scale="estimate", ood_reference=False), progress=False,
                log=logs.append)
    ts = res.meta["training_scale"]
    for source, size in (("a", 96), ("b", 64)):
        e = ts["estimates"][source]
        assert e["plausible"] and e["n_rbc"] >= 3 and e["n_images"] == 24
        assert e["um_per_px"] == pytest.approx(29.0 / size, rel=0.2), source
        assert ts["sources"][source]["origin"] == ["estimated"]
        assert ts["sources"][source]["um_per_px"] == e["um_per_px"]
    # the images were brought to the model's physical scale (not resized): the bundle has one
    assert res.meta["um_per_px"] == ts["model_um_per_px"] == res.meta["config"]["um_per_px"]
    assert json.loads((tmp_path / "est" / "config.json").read_text())["training_scale"]["estimates"]["a"]
    assert json.loads((tmp_path / "est" / "metadata.json").read_text())["training_scale"] == ts
    assert any("scale of source 'a': estimated" in line for line in logs)


def test_implausible_estimate_is_not_used_and_warned(tmp_path):
    from PIL import Image

    rows = []
    for i, label in enumerate(["LYT", "NGS"] * 3):
        p = tmp_path / f"blank{i}.png"
        Image.fromarray(np.full((48, 48, 3), 200 + i, np.uint8)).save(p)
        rows.append({"path": str(p), "label": label})
    with pytest.warns(RuntimeWarning, match="red-cell estimate not usable"):
        t, rec = resolve_training_scale(pd.DataFrame(rows), "estimate", log=quiet)
    assert t["um_per_px"].isna().all() and not rec["estimates"]["all"]["plausible"]
    assert rec["sources"]["all"]["origin"] == ["unknown"] and rec["warnings"]


def test_cv_estimates_once_for_all_folds(unscaled, tmp_path):
    res = cross_validate(unscaled, tmp_path / "cv", tiny(scale="estimate", ood_reference=False), folds=2,
                         progress=False, log=quiet)
    top = json.loads((tmp_path / "cv" / "config.json").read_text())["training_scale"]
    for k in (0, 1):
        fold = json.loads((tmp_path / "cv" / f"fold{k}" / "metadata.json").read_text())["training_scale"]
        assert fold["estimates"] == top["estimates"] and fold["model_um_per_px"] is not None
    assert len(res.predictions) == len(unscaled)


def test_lmu_crops_resized_by_a_known_factor_get_their_scale_estimated(lmu_sample, tmp_path):
    from PIL import Image

    from leukoscope.data import read_dataset
    from leukoscope.imaging.images import load_rgb
    from leukoscope.imaging.scale import LMU_UM_PER_PX, rescale

    f = 0.5
    rows = []
    for r in read_dataset(lmu_sample).table.itertuples(index=False):
        p = tmp_path / "img" / f"{r.label}_{len(rows)}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rescale(load_rgb(r.path), f)).save(p)
        rows.append({"path": str(p), "label": r.label, "source": "lmu_half"})
    res = train(pd.DataFrame(rows), tmp_path / "run", tiny(scale="estimate", ood_reference=False),
                progress=False, log=quiet)
    e = res.meta["training_scale"]["estimates"]["lmu_half"]
    assert e["plausible"] and e["n_rbc"] >= 20
    assert e["um_per_px"] == pytest.approx(LMU_UM_PER_PX / f, rel=0.1)


# --------------------------------------------------------------------------- OOD reference


def test_trained_bundle_carries_an_ood_reference_that_evaluate_uses(cells, tmp_path):
    from leukoscope.evaluate.external import evaluate_sets
    from leukoscope.models import load_bundle

    res = train(cells.table, tmp_path / "run", tiny(val_fraction=0.5), progress=False, log=quiet)
    ref = res.meta["reference"]
    assert ref["n"] == res.metrics["n_val"] == 12 and "colour" in ref and "stain" in ref
    b = load_bundle(res.bundle_path)
    assert b.meta["reference"]["n"] == 12
    assert json.loads((tmp_path / "run" / "metadata.json").read_text())["reference"]["n"] == 12
    ev = evaluate_sets(b, cells.table, n_boot=0)
    assert not any("stores no in-distribution reference" in w for w in ev.warnings)
    assert "fraction_beyond_reference_q95" in ev.ood["lmu"]


def test_failing_reference_warns_and_keeps_the_model(cells, tmp_path):
    from leukoscope.models import load_bundle

    logs = []
    with pytest.warns(RuntimeWarning, match="no out-of-distribution reference stored"):
        res = train(cells.table, tmp_path / "few", tiny(), progress=False, log=logs.append)  # 4 validation images
    b = load_bundle(res.bundle_path)
    assert "reference" not in b.meta and not (tmp_path / "few" / "checkpoint.pt").exists()
    assert any("at least 10" in line for line in logs)


def test_reference_can_be_skipped(cells, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = train(cells.table, tmp_path / "skip", tiny(val_fraction=0.5, ood_reference=False), progress=False,
                    log=quiet)
    assert "reference" not in res.meta


def test_reference_sample_is_stratified_bounded_and_seeded():
    from leukoscope.models.ood import reference_sample

    t = pd.DataFrame({"path": [f"p{i}" for i in range(1005)], "label": ["NGS"] * 700 + ["LYT"] * 300 + ["EOS"] * 5})
    assert reference_sample(t, 2000) is t
    s = reference_sample(t, 500, seed=1)
    assert 490 <= len(s) <= 500 and s.index.is_monotonic_increasing
    counts = s["label"].value_counts()
    assert abs(counts["NGS"] - 350) <= 2 and abs(counts["LYT"] - 150) <= 2
    assert s.equals(reference_sample(t, 500, seed=1)) and not s.equals(reference_sample(t, 500, seed=2))
