"""TrainConfig in groups: flat and grouped forms, old flat configs, CLI options generated from the fields."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

import pytest

from leukoscope.cli._common import add_config_options, config_option_names, config_overrides
from leukoscope.cli.train import add_train_options, config_from_args
from leukoscope.train.augment import AugmentConfig
from leukoscope.train.config import FLAT, GROUPS, TrainConfig, config_diff, setting_field
from leukoscope.train.presets import PRESETS, preset

#: A config.json as training wrote it before the groups and the fine-tuning settings existed (5e27f29).
OLD_FLAT = {"model": "plain_cnn", "input_size": 32, "um_per_px": 0.5, "epochs": 2, "per_class": 6, "batch_size": 8,
            "lr": 0.003, "weight_decay": 0.0001, "warmup_epochs": 0.5, "schedule": "cosine", "label_smoothing": 0.0,
            "patience": 5, "val_fraction": 0.1, "seed": 3, "workers": 1, "rotate": True, "flip": False,
            "brightness": 0.1, "contrast": 0.1, "stain_jitter": 0.05, "saturation": 0.25, "gamma": 0.25, "blur": 1.0,
            "white_balance": True, "scale": "estimate", "ood_reference": False, "bf16": "auto",
            "channels_last": "auto", "device": "auto", "threads": "1", "preset": "robust",
            "model_kwargs": {"widths": [8, 16], "hidden": 16, "dropout": 0.1}}


def test_old_flat_config_loads_into_the_groups_and_writes_back_the_same():
    cfg = TrainConfig.from_dict({**OLD_FLAT, "classes": ["LYT", "NGS"], "training_scale": {}})  # extra keys ignored
    assert (cfg.arch.name, cfg.arch.input_size, cfg.arch.model_kwargs["widths"]) == ("plain_cnn", 32, [8, 16])
    assert (cfg.optim.epochs, cfg.optim.per_class, cfg.seed, cfg.preset) == (2, 6, 3, "robust")
    assert cfg.augment == AugmentConfig(rotate=True, flip=False, brightness=0.1, contrast=0.1, stain_jitter=0.05,
                                        saturation=0.25, gamma=0.25, blur=1.0)
    assert (cfg.scaling.mode, cfg.scaling.white_balance) == ("estimate", True)
    assert (cfg.runtime.threads, cfg.runtime.ood_reference) == ("1", False)
    assert cfg.finetune.init_from is None and cfg.optim.balance_by == "class"  # new settings: today's behaviour
    d = cfg.to_dict()
    assert {k: d[k] for k in OLD_FLAT} == OLD_FLAT
    assert set(d) - set(OLD_FLAT) == {"balance_by", "init_from", "head_warmup_epochs", "body_lr_scale", "freeze_bn",
                                      "pretrained"}
    # an old checkpoint's config resumes: the new settings at their defaults are no difference
    assert config_diff(OLD_FLAT, d) == []
    assert config_diff(OLD_FLAT, {**d, "body_lr_scale": 0.1}) == ["body_lr_scale: 1.0 -> 0.1"]


def test_grouped_form_round_trips_through_json():
    cfg = TrainConfig(model="resnet18", epochs=4, blur=0.5, scale="estimate", init_from="runs/a", seed=7,
                      head_warmup_epochs=1, body_lr_scale=0.1, freeze_bn=True, balance_by="source_class")
    nested = json.loads(json.dumps(cfg.to_nested()))
    assert set(nested) == set(GROUPS) | {"seed", "preset"}
    assert nested["arch"]["name"] == "resnet18" and nested["scaling"]["mode"] == "estimate"
    assert nested["finetune"] == {"init_from": "runs/a", "head_warmup_epochs": 1, "body_lr_scale": 0.1,
                                  "freeze_bn": True}
    back = TrainConfig.from_dict(nested)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert config_diff(cfg.to_nested(), cfg.to_dict()) == []


def test_flat_names_read_and_write_the_groups():
    cfg = TrainConfig()
    cfg.blur = 0.7
    cfg.model = "resnet18"
    assert cfg.augment.blur == 0.7 and cfg.arch.name == "resnet18" and cfg.model == "resnet18"
    assert cfg.resolved().input_size == 128 and cfg.input_size is None  # resolved() is a copy
    with pytest.raises(TypeError, match="unknown training setting.*bogus"):
        TrainConfig(bogus=1)
    with pytest.raises(AttributeError):
        cfg.bogus = 1
    with pytest.raises(ValueError, match="balance_by must be one of"):
        TrainConfig(balance_by="lab").resolved()
    with pytest.raises(ValueError, match="body_lr_scale must be positive"):
        TrainConfig(body_lr_scale=0).resolved()


def test_the_augmentation_group_is_what_augment_batch_takes():
    assert preset("robust").augment == AugmentConfig(brightness=0.1, contrast=0.1, stain_jitter=0.1, saturation=0.25,
                                                     gamma=0.25, blur=1.0)
    assert preset("robust").augment.colour == {"stain": 0.1, "saturation": 0.25, "gamma": 0.25, "blur": 1.0}


def test_every_setting_has_help_and_an_option():
    p = argparse.ArgumentParser()
    add_train_options(p)
    text = p.format_help()
    names = config_option_names()
    for name in FLAT:
        f = setting_field(name)
        if f.metadata.get("cli", True):
            assert f.metadata.get("help"), name
            assert "--" + name.replace("_", "-") in text, name
    assert "model_kwargs" not in names and "seed" in names and "--seed" in text
    # today's option names still work, with their forms (const, --no-*)
    args = p.parse_args(["d", "--per-class", "7", "--stain-jitter", "--no-white-balance", "--um-per-px", "0.3",
                         "--init-from", "b.safetensors", "--body-lr-scale", "0.1", "--freeze-bn",
                         "--head-warmup-epochs", "2", "--balance-by", "source_class", "--no-rotate"])
    cfg = config_from_args(args)
    assert (cfg.per_class, cfg.stain_jitter, cfg.white_balance, cfg.um_per_px) == (7, 0.05, False, 0.3)
    assert (cfg.init_from, cfg.body_lr_scale, cfg.freeze_bn, cfg.head_warmup_epochs, cfg.balance_by, cfg.rotate) == \
        ("b.safetensors", 0.1, True, 2, "source_class", False)
    assert cfg.saturation == 0.25  # not given: the default preset's (robust)
    with pytest.raises(SystemExit):
        p.parse_args(["d", "--balance-by", "lab"])


def test_a_new_field_becomes_an_option_with_the_presets_values_in_its_help():
    p = argparse.ArgumentParser()
    add_config_options(p, PRESETS)
    action = next(a for a in p._actions if a.dest == "epochs")
    assert action.default is None and "fast: 6" in action.help and "robust: 18" in action.help
    assert config_overrides(p.parse_args(["--epochs", "3", "--gamma", "0.1"])) == {"epochs": 3, "gamma": 0.1}
    # the options follow the fields: one per setting with cli metadata, no more
    dests = {a.dest for a in p._actions if a.dest != "help"}
    assert dests == set(config_option_names())
    assert {f.name for f in fields(GROUPS["finetune"])} <= dests
