"""Property-based fuzzing (issue 17 item 12) of the image loader, the annotations/manifest readers and the
bundle loader: arbitrary bytes and mutated valid files give a result or the project's own error naming
the file (:class:`ImageError`, :class:`DataError`, :class:`NotABundleError`), never another exception.

A hang fails through hypothesis' ``deadline``; memory is bounded by the loaders' own limits (the image
loader's ``max_pixels``). Small ``max_examples`` keep the whole module to a few seconds; set
``LEUKOSCOPE_FUZZ_EXAMPLES=500`` to explore more (random) inputs.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from safetensors.torch import save_file

from leukoscope.data.readers import DataError, read_annotations, read_dataset, read_manifest
from leukoscope.imaging.images import ImageError, load_rgb
from leukoscope.models.bundle import META_KEY, NotABundleError, load_bundle, make_meta, save_bundle
from leukoscope.models.registry import create_model

#: the loader's own size limit, small here so that a mutated header cannot make it allocate much
MAX_PIXELS = 250_000
#: 25 fixed (derandomised) examples per test in the suite; LEUKOSCOPE_FUZZ_EXAMPLES=N explores N random ones
_EXPLORE = int(os.environ.get("LEUKOSCOPE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXPLORE or 25, deadline=2000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not _EXPLORE)


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Build the valid inputs and load a bundle once before any timed example (lazy imports are slow)."""
    _valid_images()
    load_bundle(_write(_valid_bundle(), "model.safetensors"))


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with up to 8 bytes replaced (biased to the header) and perhaps truncated."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 8))):
        hi = len(buf) - 1 if draw(st.booleans()) else min(len(buf) - 1, 200)
        buf[draw(st.integers(0, hi))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        buf = buf[: draw(st.integers(0, len(buf)))]
    return bytes(buf)


def _write(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fuzz-"))
    p = d / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------- images


@lru_cache(maxsize=None)
def _valid_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    out = {}
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp")):
        b = io.BytesIO()
        Image.fromarray(rgb).save(b, fmt)
        out[suffix] = b.getvalue()
    b = io.BytesIO()
    tifffile.imwrite(b, rgb, photometric="rgb")
    out[".tiff"] = b.getvalue()
    b = io.BytesIO()
    tifffile.imwrite(b, (rgb.astype(np.uint16) * 16), photometric="rgb", bitspersample=12)
    out[".tif"] = b.getvalue()
    return out


def _check_image(path: Path) -> None:
    try:
        img = load_rgb(path, max_pixels=MAX_PIXELS)
    except ImageError as exc:
        assert exc.path == str(path) and exc.reason
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".png", ".tiff", ".jpg", ".bmp"]))
def test_image_loader_on_arbitrary_bytes(data, suffix):
    _check_image(_write(data, "cell" + suffix))


@FUZZ
@given(st.data())
def test_image_loader_on_mutated_valid_files(data):
    suffix = data.draw(st.sampled_from(sorted(_valid_images())))
    _check_image(_write(data.draw(mutated(_valid_images()[suffix])), "cell" + suffix))


def test_mutated_files_are_decoded_or_refused_at_least_once_each():
    """The fuzz inputs exercise both outcomes: an intact file loads, a truncated one is refused."""
    for suffix, valid in _valid_images().items():
        assert load_rgb(_write(valid, "ok" + suffix), max_pixels=MAX_PIXELS).shape == (24, 20, 3)
        with pytest.raises(ImageError):
            load_rgb(_write(valid[: len(valid) // 3], "cut" + suffix), max_pixels=MAX_PIXELS)


# --------------------------------------------------------------------------- annotations.dat and manifests

VALID_ANNOTATIONS = ("MYO/MYO_0001.tiff MYO nan nan\nNGS/NGS_0001.tiff NGS NGS UNC\n"
                     "LYT/LYT_0001.tiff LYT LYT LYT\n").encode()
VALID_MANIFEST = ("path,label,patient,source,um_per_px\nimg/a.png,MYO,p1,lab,0.1\nimg/b.png,NGS,p2,lab,\n"
                  "img/c.png,,p3,lab,0.2\n").encode()


def _check_reader(path: Path, read) -> None:
    try:
        read(path)
    except DataError as exc:
        assert str(path) in str(exc)


def _read_manifest_unchecked(path):
    return read_manifest(path, check_files=False)


@FUZZ
@given(data=st.binary(max_size=1024), which=st.sampled_from(["annotations", "manifest"]))
def test_readers_on_arbitrary_bytes(data, which):
    if which == "annotations":
        _check_reader(_write(data, "annotations.dat"), read_annotations)
    else:
        _check_reader(_write(data, "labels.csv"), _read_manifest_unchecked)


@FUZZ
@given(st.data())
def test_readers_on_mutated_valid_files(data):
    which = data.draw(st.sampled_from(["annotations", "manifest", "manifest_files"]))
    if which == "annotations":
        path = _write(data.draw(mutated(VALID_ANNOTATIONS)), "annotations.dat")
        _check_reader(path.parent, read_dataset)  # the LMU layout: the annotations against the (empty) folder
    elif which == "manifest":
        _check_reader(_write(data.draw(mutated(VALID_MANIFEST)), "labels.csv"), _read_manifest_unchecked)
    else:
        path = _write(data.draw(mutated(VALID_MANIFEST)), "labels.csv")
        (path.parent / "img").mkdir()
        for name in "abc":
            Image.new("RGB", (8, 8)).save(path.parent / "img" / f"{name}.png")
        _check_reader(path, read_dataset)


def test_the_valid_reader_inputs_read():
    ann = read_annotations(_write(VALID_ANNOTATIONS, "annotations.dat"))
    assert ann["gold"].tolist() == ["MYO", "NGS", "LYT"]
    assert _read_manifest_unchecked(_write(VALID_MANIFEST, "labels.csv")).table["label"].tolist() == ["MYO", "NGS"]


# --------------------------------------------------------------------------- model bundles

_KWARGS = {"widths": [4], "hidden": 4, "dropout": 0.0}


@lru_cache(maxsize=None)
def _valid_bundle() -> bytes:
    model = create_model("plain_cnn", num_classes=2, input_size=16, **_KWARGS)
    meta = make_meta(classes=["LYT", "NGS"], model="plain_cnn", input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                     um_per_px=None, config={"model_kwargs": _KWARGS})
    path = save_bundle(model, meta, Path(tempfile.mkdtemp(prefix="fuzz-")) / "model.safetensors")
    return path.read_bytes()


def _check_bundle(path: Path) -> None:
    try:
        bundle = load_bundle(path)
    except NotABundleError as exc:
        assert str(path) in str(exc)
        return
    assert len(bundle.classes) >= 1


#: JSON-like values; no subnormal floats: a library loaded earlier in the suite may flush them to zero
_leaves = (st.none() | st.booleans() | st.integers(-10, 10 ** 6) | st.floats(allow_subnormal=False)
           | st.text(max_size=8))
json_values = st.recursive(_leaves, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_bundle_loader_on_arbitrary_bytes(data):
    _check_bundle(_write(data, "model.safetensors"))


@FUZZ
@given(st.data())
def test_bundle_loader_on_mutated_valid_bundles(data):
    _check_bundle(_write(data.draw(mutated(_valid_bundle())), "model.safetensors"))


@FUZZ
@given(key=st.sampled_from(["classes", "model", "input_size", "mean", "std", "temperature", "config", "um_per_px",
                            "pipeline", "channels_last"]), value=json_values)
def test_bundle_loader_on_valid_files_with_hostile_metadata(key, value):
    path = _write(_valid_bundle(), "model.safetensors")
    with tempfile.TemporaryDirectory() as d:
        meta = dict(load_bundle(path).meta)
        meta[key] = value
        model = create_model("plain_cnn", num_classes=2, input_size=16, **_KWARGS)
        tmp = Path(d) / "x.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={META_KEY: json.dumps(meta)})
        path.write_bytes(tmp.read_bytes())
    _check_bundle(path)


def test_the_valid_bundle_loads_and_its_weights_are_used():
    b = load_bundle(_write(_valid_bundle(), "model.safetensors"))
    assert b.classes == ("LYT", "NGS")
    assert all(torch.isfinite(p).all() for p in b.model.parameters())
