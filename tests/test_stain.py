"""Stain and colour augmentation (determinism, identity, range) and Reinhard normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukoscope.imaging.colour import lab_stats, normalize_stain, reference_stats
from leukoscope.train.augment import blur_jitter, colour_augment, gamma_jitter, hed_jitter, hed_to_rgb, rgb_to_hed, saturation_jitter
from leukoscope.train import augment as aug


def batch(n=4, s=24, seed=0):
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_hed_conversion_matches_skimage_and_round_trips():
    from skimage.color import rgb2hed

    x = batch(2, 8)
    h = rgb_to_hed(x)
    ref = np.stack([rgb2hed(img.permute(1, 2, 0).numpy()) for img in x]).transpose(0, 3, 1, 2)
    # skimage clips negative concentrations to 0; we keep them so that the round trip is exact
    np.testing.assert_allclose(h.clamp_min(0).numpy(), ref, atol=1e-5)
    torch.testing.assert_close(hed_to_rgb(h), x, atol=1e-4, rtol=0)


def test_hed_jitter_same_seed_same_tensor_other_seed_other_tensor():
    x = batch()
    a = hed_jitter(x, gen(7), sigma=0.05, bias=0.05)
    b = hed_jitter(x, gen(7), sigma=0.05, bias=0.05)
    c = hed_jitter(x, gen(8), sigma=0.05, bias=0.05)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert (a - x).abs().max() > 1e-3          # it does change the image
    # each image gets its own draw
    same = hed_jitter(x[:1].repeat(2, 1, 1, 1), gen(3))
    assert not torch.allclose(same[0], same[1], atol=1e-4)


def test_hed_jitter_is_identity_without_noise_and_stays_in_unit_range():
    x = batch()
    torch.testing.assert_close(hed_jitter(x, gen(0), sigma=0.0, bias=0.0), x, atol=1e-5, rtol=0)
    strong = hed_jitter(x, gen(1), sigma=0.5, bias=0.5)
    assert strong.min() >= 0 and strong.max() <= 1
    edge = torch.cat([torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)])
    out = hed_jitter(edge, gen(2), sigma=0.3, bias=0.3)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_hed_jitter_rejects_uint8_or_nhwc():
    with pytest.raises(ValueError, match="float NCHW"):
        hed_jitter(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), gen(0))


@pytest.mark.parametrize("fn", [saturation_jitter, gamma_jitter, blur_jitter])
def test_colour_helpers_deterministic_in_range_and_not_identity(fn):
    x = batch()
    a, b = fn(x, gen(5)), fn(x, gen(5))
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(fn(x, gen(6)), a)


def test_blur_keeps_mean_and_lowers_variance():
    x = batch(2, 32)
    y = blur_jitter(x, gen(0), max_sigma=2.0, p=1.0)
    assert y.mean().item() == pytest.approx(x.mean().item(), abs=0.01)
    assert y.std() < x.std()


def test_colour_augment_chain_is_deterministic():
    x = batch()
    kw = dict(stain=0.1, saturation=0.2, gamma=0.2, blur=1.0)
    assert torch.equal(colour_augment(x, gen(1), **kw), colour_augment(x, gen(1), **kw))


def test_trainers_augmentation_calls_hed_jitter_when_asked():
    x = torch.full((2, 16, 16, 3), 180, dtype=torch.uint8)
    off = aug.augment_batch(x, gen(0), aug.AugmentConfig(rotate=False, flip=False))
    on = aug.augment_batch(x, gen(0), aug.AugmentConfig(rotate=False, flip=False, stain_jitter=0.1))
    assert not torch.allclose(off, on)


def _tinted(img, shift):
    return np.clip(img.astype(int) + np.array(shift), 0, 255).astype(np.uint8)


def test_reinhard_maps_a_tinted_image_back_to_the_reference_colour():
    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), (235, 225, 215), np.uint8)
    img[10:30, 10:30] = (200, 140, 150)
    img[35:55, 30:50] = (90, 50, 140)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    ref = reference_stats([img])
    tinted = _tinted(img, (-30, 10, 25))
    out = normalize_stain(tinted, target=ref)
    assert out.dtype == np.uint8 and out.shape == img.shape
    m_ref, _ = lab_stats(img)
    m_out, _ = lab_stats(out)
    m_tint, _ = lab_stats(tinted)
    assert np.abs(m_out - m_ref).max() < 1.0 < np.abs(m_tint - m_ref).max()
    assert np.abs(out.astype(int) - img.astype(int)).mean() < np.abs(tinted.astype(int) - img.astype(int)).mean() / 3


def test_normalize_stain_needs_a_target_and_a_known_method():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="target"):
        normalize_stain(img, target={})
    with pytest.raises(ValueError, match="reinhard"):
        normalize_stain(img, method="vahadane", target={"mean": [0, 0, 0], "std": [1, 1, 1]})
