"""Model registry, the one preprocessing path, bundles (save/load/reject), ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leukoscope import INTENDED_USE
from leukoscope.models import (
    NotABundleError, create_model, get_config, list_models, load_bundle, prepare_image, read_meta, save_bundle,
)
from leukoscope.models.bundle import make_meta
from leukoscope.imaging.scale import LMU_UM_PER_PX

SMALL = {"widths": [4, 8], "hidden": 8, "dropout": 0.0}


def _bundle(tmp_path, classes=("LYT", "MOB", "MYO", "NGS"), um=0.29):
    torch.manual_seed(0)
    model = create_model("plain_cnn", num_classes=len(classes), **SMALL).eval()
    meta = make_meta(classes=classes, model="plain_cnn", input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                     um_per_px=um, temperature=1.7, config={"model_kwargs": SMALL, "epochs": 1},
                     fingerprint="abc", metrics={"val_balanced_accuracy": 0.5})
    path = save_bundle(model, meta, tmp_path / "model.safetensors")
    return model, meta, path


def test_registry_has_the_paper_models_and_fast_candidates():
    names = list_models()
    for n in ("resnext50_32x4d", "plain_cnn", "resnet18", "mobilenet_v3_small"):
        assert n in names
    cfg = get_config("resnext50_32x4d")
    assert (cfg.input_size, cfg.num_classes) == (400, 15)
    assert cfg.um_per_px == pytest.approx(LMU_UM_PER_PX)
    assert get_config("resnext50_32x4d", input_size=200).um_per_px == pytest.approx(2 * LMU_UM_PER_PX)
    with pytest.raises(ValueError, match="known models: .*plain_cnn"):
        get_config("vgg_9000")


def test_resnext_is_cardinality_32_from_scratch():
    m = create_model("resnext50_32x4d")
    assert m.layer1[0].conv2.groups == 32 and m.fc.out_features == 15


@pytest.mark.parametrize("name", ["plain_cnn", "resnet18", "mobilenet_v3_small", "mobilenet_v3_large",
                                  "efficientnet_b0"])
def test_models_build_and_run(name):
    m = create_model(name, num_classes=3).eval()
    with torch.inference_mode():
        assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_prepare_image_uses_physical_scale_when_known_and_resizes_otherwise():
    img = np.zeros((100, 120, 3), np.uint8)
    img[40:60, 50:70] = 255
    assert prepare_image(img, 64).shape == (64, 64, 3)
    # 1 µm/px image into a 0.5 µm/px model: twice as large, centre-cropped: the 20 px square becomes 40 px
    out = prepare_image(img, 64, model_um_per_px=0.5, image_um_per_px=1.0)
    assert out.shape == (64, 64, 3)
    assert 1400 <= (out[..., 0] > 127).sum() <= 1800
    # a smaller field is reflect-padded, never black
    bg = np.full((40, 40, 3), 200, np.uint8)
    assert prepare_image(bg, 64, model_um_per_px=1.0, image_um_per_px=1.0).min() == 200


def test_bundle_round_trip_preserves_metadata_and_predictions(tmp_path):
    model, meta, path = _bundle(tmp_path)
    b = load_bundle(path)
    assert b.classes == ("LYT", "MOB", "MYO", "NGS") and b.input_size == 32 and b.um_per_px == 0.29
    assert b.meta["temperature"] == 1.7 and b.meta["intended_use"] == INTENDED_USE
    assert b.meta["config"]["model_kwargs"] == SMALL and b.meta["fingerprint"] == "abc"
    assert {"torch", "leukoscope"} <= set(b.meta["versions"])
    imgs = [np.random.default_rng(i).integers(0, 255, (40, 44, 3), dtype=np.uint8) for i in range(5)]
    x = b.preprocess(imgs)
    with torch.inference_mode():
        want = torch.softmax(model(x) / 1.7, 1).numpy()
    got = b.predict_proba(imgs, batch_size=2)
    assert np.allclose(got, want, atol=1e-5)
    assert np.allclose(b.predict_proba(imgs, calibrated=False).sum(1), 1)
    # the RUN folder works as well as the file
    assert read_meta(tmp_path)["classes"] == list(b.classes)


def test_loading_a_file_that_is_not_a_bundle_fails_clearly(tmp_path):
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(NotABundleError, match="weights.safetensors is not a LeukoScope model bundle"):
        load_bundle(junk)
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(NotABundleError, match="model.pt"):
        load_bundle(pickle)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(NotABundleError, match="no 'leukoscope' metadata"):
        load_bundle(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_bundle(tmp_path / "missing.safetensors")


def test_bundle_classes_must_be_taxonomy_classes_in_order():
    with pytest.raises(ValueError, match="taxonomy order"):
        make_meta(classes=["NGS", "LYT"], model="plain_cnn", input_size=32, mean=(0,) * 3, std=(1,) * 3,
                  um_per_px=None)
    with pytest.raises(ValueError, match="unknown class"):
        make_meta(classes=["XYZ"], model="plain_cnn", input_size=32, mean=(0,) * 3, std=(1,) * 3, um_per_px=None)


def test_onnx_export_matches_pytorch(tmp_path):
    import onnx

    from leukoscope.models.export import export_onnx

    _, _, path = _bundle(tmp_path)
    check = export_onnx(load_bundle(path), tmp_path / "m.onnx")
    assert check["same_predictions"] and check["max_abs_diff"] < 1e-3
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["leukoscope"])["classes"] == ["LYT", "MOB", "MYO", "NGS"]


def test_bf16_bundle_reruns_near_ties_in_fp32(tmp_path):
    """bf16 bundles: images whose top-two probabilities lie within the guard get fp32's answer exactly."""
    model, meta, _ = _bundle(tmp_path)
    imgs = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    fp32 = load_bundle(save_bundle(model, {**meta, "inference_bf16": False}, tmp_path / "a.safetensors"))
    want = fp32.logits(torch.from_numpy(imgs))
    # a guard of 1 covers every image: all re-run in fp32, logits identical to the fp32 bundle's
    every = load_bundle(save_bundle(model, {**meta, "inference_bf16": True, "bf16_guard": 1.0},
                                    tmp_path / "b.safetensors"))
    assert torch.equal(every.logits(torch.from_numpy(imgs)), want) and every.last_fp32_rechecked == len(imgs)
    assert torch.equal(every.logits(imgs), want)  # numpy input takes the same path
    # a guard of 0 re-runs nothing: plain bf16, which differs from fp32
    none = load_bundle(save_bundle(model, {**meta, "inference_bf16": True, "bf16_guard": 0.0},
                                   tmp_path / "c.safetensors"))
    z16 = none.logits(imgs)
    assert none.last_fp32_rechecked == 0 and not torch.equal(z16, want)
    assert (z16 - want).abs().max() < 0.1  # bf16 is close, but not the same


def test_bf16_check_decides_from_validation_logits():
    from leukoscope.models.precision import bf16_check

    g = torch.Generator().manual_seed(0)
    z32 = torch.randn(200, 5, generator=g) * 4
    # bf16-like error: every probability shift below 0.005, so clear calls never flip
    z16 = z32 + torch.randn(200, 5, generator=g) * 0.01
    r = bf16_check(z32, z16)
    assert r["max_abs_prob_diff"] < 0.01 and r["max_gap_shift"] <= 2 * r["max_abs_prob_diff"]
    assert r["bf16_guard"] == pytest.approx(max(0.01, 2 * r["max_gap_shift"]))
    # the guard bounds every bf16 gap move: an image outside it cannot change its call
    p32, p16 = torch.softmax(z32.double(), 1), torch.softmax(z16.double(), 1)
    top2 = p16.topk(2, 1).values
    outside = (top2[:, 0] - top2[:, 1]) >= r["bf16_guard"]
    assert torch.equal(p16[outside].argmax(1), p32[outside].argmax(1))
    assert r["agreement_with_recheck"] == 1.0 and r["recheck_fraction"] < 0.25 and r["inference_bf16"]
    # a near-flat model (every call a near-tie): re-running most of it in fp32 would not pay
    flat = bf16_check(z32 * 0.001, z32 * 0.001 + torch.randn(200, 5, generator=g) * 0.01)
    assert not flat["inference_bf16"] and flat["recheck_fraction"] > 0.25 and "would not pay" in flat["reason"]
    assert not bf16_check(torch.zeros(0, 5), torch.zeros(0, 5))["inference_bf16"]


def test_forward_runs_a_depthwise_model_through_onnxruntime_with_torch_s_numbers(tmp_path):
    """The one forward path: fp32 on CPU for a MobileNet goes through onnxruntime (the model exported in
    memory once), with PyTorch's logits and penultimate features; a change of the weights rebuilds it."""
    from leukoscope.models import inference

    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", num_classes=4, input_size=32).eval()
    meta = make_meta(classes=["LYT", "MOB", "MYO", "NGS"], model="mobilenet_v3_small", input_size=32,
                     mean=(0.5,) * 3, std=(0.25,) * 3, um_per_px=None)
    b = load_bundle(save_bundle(model, meta, tmp_path / "m.safetensors"))
    x = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    assert inference.uses_onnxruntime(b) and not inference.uses_onnxruntime(b, "torch")
    ort_out = inference.forward(b, x, features=True, batch_size=3)
    session = inference._SESSIONS[b.model][0]
    pt_out = inference.forward(b, x, features=True, batch_size=3, backend="torch")
    assert torch.allclose(ort_out.logits, pt_out.logits, atol=1e-4)
    assert np.allclose(ort_out.features, pt_out.features, atol=1e-4) and ort_out.features.shape[0] == 5
    assert torch.equal(inference.forward(b, x).logits, ort_out.logits)  # the same session, the same numbers
    assert inference._SESSIONS[b.model][0] is session
    with torch.no_grad():
        b.model.classifier[-1].bias += 1.0
    shifted = inference.forward(b, x).logits
    assert inference._SESSIONS[b.model][0] is not session
    assert torch.allclose(shifted, ort_out.logits + 1.0, atol=1e-4)


def test_bundle_pipeline_is_stored_and_follows_the_metadata_fields(tmp_path):
    """The preprocessing is stored as data; an old bundle without it and a field edited after make_meta both
    get the pipeline the fields describe."""
    from leukoscope.models.pipeline import Pipeline

    model, meta, path = _bundle(tmp_path)
    steps = read_meta(path)["pipeline"]["steps"]
    assert [s["name"] for s in steps] == ["physical_scale", "crop_or_pad", "normalize"]
    assert steps[0]["um_per_px"] == 0.29 and steps[1]["size"] == 32
    old = {k: v for k, v in meta.items() if k != "pipeline"}
    assert Pipeline.from_meta(old).to_dict() == Pipeline.from_meta(meta).to_dict()
    edited = {**meta, "input_size": 40, "white_balance": True}
    b = load_bundle(save_bundle(model, edited, tmp_path / "edited.safetensors"))
    assert [s["name"] for s in b.meta["pipeline"]["steps"]][0] == "white_balance"
    assert b.pipeline.input_size == 40 and b.prepare([np.zeros((50, 50, 3), np.uint8)]).shape == (1, 40, 40, 3)
