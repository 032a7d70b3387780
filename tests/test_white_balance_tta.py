"""White balance on each image's own background (training and inference) and test-time augmentation."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from leukoscope.models.pipeline import dihedral_views, prepare_image
from leukoscope.imaging.colour import background_colour, white_balance
from leukoscope.train import TrainConfig, train

from conftest import TINY as BASE_TINY
from conftest import shared_path as shared

TINY = {**BASE_TINY, "per_class": 8, "seed": 0, "val_fraction": 0.5}  # conftest's tiny config; data: conftest's cells


def quiet(_):
    pass


def cast(img: np.ndarray, gains=(1.0, 0.88, 0.78)) -> np.ndarray:
    """The same slide under a yellowish illuminant: each channel scaled (no clipping for gains <= 1)."""
    return (img.astype(np.float32) * np.asarray(gains, np.float32) + 0.5).clip(0, 255).astype(np.uint8)


def test_white_balance_makes_the_background_neutral_and_is_deterministic(cells):
    from leukoscope.imaging.images import load_rgb

    img = cast(load_rgb(cells.table["path"][0]))
    out = white_balance(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    bg = background_colour(out)
    assert np.abs(bg - 240).max() <= 3, bg
    assert np.array_equal(out, white_balance(img))
    with pytest.raises(ValueError, match="uint8"):
        white_balance(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        white_balance(img[..., 0])


def test_white_balance_undoes_an_illuminant_cast_on_real_cells():
    """A real LMU cell and a PBC cell, each under a yellow and a blue cast: after white balance the
    two casts of one cell agree within a few grey levels, before it they differ by tens."""
    from leukoscope.imaging.images import load_rgb

    lmu = sorted(shared("aml_lmu_sample").rglob("*.tif*"))[0]
    pbc = sorted(shared("pbc", "images").rglob("*.jpg"))[0]
    for path in (lmu, pbc):
        img = load_rgb(path)
        yellow, blue = cast(img, (1.0, 0.9, 0.75)), cast(img, (0.8, 0.85, 1.0))
        before = np.abs(yellow.astype(int) - blue.astype(int)).mean()
        after = np.abs(white_balance(yellow).astype(int) - white_balance(blue).astype(int)).mean()
        assert before > 15 and after < 3, (path.name, before, after)


def test_prepare_image_applies_white_balance_before_resizing(cells):
    from leukoscope.imaging.images import load_rgb

    img = cast(load_rgb(cells.table["path"][0]))
    assert np.array_equal(prepare_image(img, 32, white_balance=True), prepare_image(white_balance(img), 32))
    assert not np.array_equal(prepare_image(img, 32, white_balance=True), prepare_image(img, 32))


def test_cache_built_without_white_balance_is_not_reused_with_it(cells):
    from leukoscope.train.cache import build_cache

    c = build_cache(cells.table.head(4), 32, None, workers=1)
    assert c.compatible(32, None) and not c.compatible(32, None, white_balance=True)
    wb = build_cache(cells.table.head(4), 32, None, workers=1, white_balance=True)
    assert wb.compatible(32, None, True) and not torch.equal(c.images, wb.images)


def test_trained_with_white_balance_the_bundle_applies_it_and_ignores_a_cast(cells, tmp_path):
    from leukoscope.imaging.images import load_rgb
    from leukoscope.models import load_bundle

    res = train(cells.table, tmp_path / "run", TrainConfig(**TINY, white_balance=True, ood_reference=False),
                progress=False, log=quiet)
    assert res.meta["white_balance"] is True and res.meta["config"]["white_balance"] is True
    b = load_bundle(res.bundle_path)
    assert b.white_balance
    imgs = [load_rgb(p) for p in cells.table["path"][:8]]
    x = b.prepare(imgs)
    assert np.array_equal(x[0], prepare_image(imgs[0], 32, white_balance=True))
    p_plain = b.predict_proba(imgs)
    p_cast = b.predict_proba([cast(i) for i in imgs])
    assert np.abs(p_plain - p_cast).max() < 0.05
    res0 = train(cells.table, tmp_path / "run0", TrainConfig(**TINY, ood_reference=False), progress=False, log=quiet)
    assert res0.meta["white_balance"] is False and not load_bundle(res0.bundle_path).white_balance


def test_cli_white_balance_reaches_the_config():
    from leukoscope.cli.train import add_train_options, config_from_args

    p = argparse.ArgumentParser()
    add_train_options(p)
    assert config_from_args(p.parse_args(["d", "--preset", "fast", "--white-balance"])).white_balance is True
    assert config_from_args(p.parse_args(["d", "--no-white-balance"])).white_balance is False
    assert config_from_args(p.parse_args(["d", "--preset", "fast"])).white_balance is False
    assert config_from_args(p.parse_args(["d"])).white_balance is True  # the default preset is robust


# --------------------------------------------------------------------------- test-time augmentation


def test_dihedral_views_are_the_eight_symmetries_identity_first():
    x = torch.arange(2 * 3 * 3 * 3, dtype=torch.uint8).reshape(2, 3, 3, 3)
    v = dihedral_views(x)
    assert len(v) == 8 and torch.equal(v[0], x)
    assert len({bytes(t.contiguous().numpy()) for t in v}) == 8
    for t in v:  # each view is a permutation of each image's pixels
        assert torch.equal(t.reshape(2, -1, 3).sort(1).values, x.reshape(2, -1, 3).sort(1).values)
    with pytest.raises(ValueError, match="NHWC"):
        dihedral_views(x[0])


def test_tta_is_the_mean_over_views_and_invariant_to_rotation(cells, tmp_path):
    from leukoscope.models import load_bundle

    res = train(cells.table, tmp_path / "run", TrainConfig(**TINY, ood_reference=False), progress=False, log=quiet)
    b = load_bundle(res.bundle_path)
    x = torch.from_numpy(b.prepare(list(cells.table["path"][:6])))
    p_tta = b.predict_proba(x, tta=True)
    by_hand = np.mean([b.predict_proba(v) for v in dihedral_views(x)], axis=0)
    assert np.allclose(p_tta, by_hand, atol=1e-6) and np.allclose(p_tta.sum(1), 1)
    # batched (4 + 2 images, each batch with its 8 views) as the whole set; no image -> no row
    assert np.allclose(b.predict_proba(x, tta=True, batch_size=4), p_tta, atol=1e-6)
    assert b.predict_proba(x[:0], tta=True).shape == (0, len(b.classes))
    rotated = torch.rot90(x, 1, dims=(1, 2)).contiguous()
    raw = dict(calibrated=False)  # the tiny model's temperature flattens every probability to ~1/4
    gap_tta = np.abs(b.predict_proba(rotated, tta=True, **raw) - b.predict_proba(x, tta=True, **raw)).max()
    gap_plain = np.abs(b.predict_proba(rotated, **raw) - b.predict_proba(x, **raw)).max()
    assert gap_tta < 1e-6 < 1e-4 < gap_plain, (gap_tta, gap_plain)  # without TTA a rotation changes the output


def test_evaluate_with_tta_scores_the_averaged_probabilities(cells, tmp_path):
    from leukoscope.evaluate.external import evaluate_sets
    from leukoscope.models import load_bundle

    res = train(cells.table, tmp_path / "run", TrainConfig(**TINY), progress=False, log=quiet)
    b = load_bundle(res.bundle_path)
    plain = evaluate_sets(b, cells.table, n_boot=0)
    tta = evaluate_sets(b, cells.table, n_boot=0, tta=True)
    p = tta.predictions.sort_values("path")
    expected = b.predict_proba(list(p["path"]), tta=True)
    cols = [f"prob_{c}" for c in b.classes]
    assert np.allclose(p[cols].to_numpy(), expected, atol=1e-5)
    # (the tiny model's temperature flattens its probabilities: differences are small but real)
    assert np.abs(p[cols].to_numpy() - plain.predictions.sort_values("path")[cols].to_numpy()).max() > 1e-6
    # the OOD check sees the same plain-view confidence either way
    src = next(iter(plain.ood))
    assert tta.ood[src].get("mean_max_prob") == pytest.approx(plain.ood[src].get("mean_max_prob"))


def test_ood_colour_features_of_a_white_balancing_bundle_ignore_a_cast(cells, tmp_path):
    """The colour part of the OOD check looks at what the model sees: for a bundle that white-balances,
    a cast copy of the cells has (nearly) the colour features of the originals; for one that does not,
    it is far away."""
    from PIL import Image

    from leukoscope.models.ood import prepare_images
    from leukoscope.imaging.images import load_rgb
    from leukoscope.models import load_bundle

    paths = list(cells.table["path"][:6])
    cast_paths = []
    for i, p in enumerate(paths):
        q = tmp_path / f"cast{i}.png"
        Image.fromarray(cast(load_rgb(p))).save(q)
        cast_paths.append(str(q))
    gaps = {}
    for wb in (True, False):
        res = train(cells.table, tmp_path / f"run{wb}", TrainConfig(**TINY, white_balance=wb, ood_reference=False),
                    progress=False, log=quiet)
        b = load_bundle(res.bundle_path)
        _, _, _, col = prepare_images(b, paths, [None] * 6, colour=True)
        _, _, _, col_cast = prepare_images(b, cast_paths, [None] * 6, colour=True)
        gaps[wb] = float(np.abs(col - col_cast).max())
    assert gaps[True] < 1.5 < 5 < gaps[False], gaps
