"""A trained model as one ``.safetensors`` file: weights plus LeukoScope metadata.

The metadata JSON lives under the safetensors header key ``leukoscope``: classes
(taxonomy order), model name, input_size, mean, std, um_per_px at the model input,
temperature, the effective config, the training-data fingerprint, validation
metrics, library versions and the intended use. Loading never unpickles. A bundle whose
weights hold a NaN or infinite value is neither written nor loaded (:func:`nonfinite_tensors`).

>>> b = load_bundle("runs/pbc/model.safetensors")          # doctest: +SKIP
>>> b.classes[:2], b.meta["temperature"]                    # doctest: +SKIP
(('BAS', 'EBO'), 1.31)
>>> p = b.predict_proba(["cell.png"])                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leukoscope import INTENDED_USE, __version__, taxonomy
from leukoscope.io import _json_default, atomic_path
from leukoscope.models.inference import forward, prepare_batch
from leukoscope.models.pipeline import PIPELINE_KEY, Pipeline
from leukoscope.models.registry import create_model

META_KEY = "leukoscope"
FORMAT = "leukoscope-bundle/1"


class NotABundleError(ValueError):
    """The file is not a LeukoScope model bundle."""


def library_versions() -> dict:
    import torchvision  # start-up: about 1 s, needed only for the versions a saved bundle records

    return {"leukoscope": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "safetensors": getattr(safetensors, "__version__", "?"), "numpy": np.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- the bundle


class ModelBundle:
    """A loaded model with its metadata; ``model`` is in eval mode."""

    def __init__(self, model, meta: dict, path: str | None = None, device: str = "cpu"):
        self.model = model.eval()
        self.meta = meta
        self.path = path
        self.device = device
        self.pipeline = Pipeline.from_meta(meta)  # white balance -> physical scale -> crop/pad -> normalise
        self.last_fp32_rechecked = 0  # images of the last logits() call re-run in fp32 (bf16 bundles)
        self.backend = "auto"  # leukoscope.models.inference.BACKENDS: fp32 on CPU through onnxruntime

    # metadata shortcuts
    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def mean(self):
        return tuple(self.meta["mean"])

    @property
    def std(self):
        return tuple(self.meta["std"])

    @property
    def um_per_px(self) -> float | None:
        return self.meta.get("um_per_px")

    @property
    def white_balance(self) -> bool:
        """Whether inputs are white-balanced on their own background (as the training images were)."""
        return bool(self.meta.get("white_balance", False))

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature") or 1.0)

    def __repr__(self) -> str:
        return (f"ModelBundle({self.meta.get('model')!r}, {len(self.classes)} classes, "
                f"input {self.input_size}px, um_per_px={self.um_per_px}, T={self.temperature:.3g})")

    # the one inference path (leukoscope.models.inference): raw images in, always prepared the same way
    def prepare(self, images, um_per_px=None) -> np.ndarray:
        """Images (paths or RGB uint8 arrays) -> uint8 ``(N, S, S, 3)`` through the bundle's pipeline."""
        return prepare_batch(self, images, um_per_px)

    def preprocess(self, images, um_per_px=None):
        """Images (paths or RGB uint8 arrays) -> normalised float NCHW tensor ready for ``model``."""
        return self.pipeline.normalize(self.prepare(images, um_per_px))

    def logits(self, images, um_per_px=None, batch_size: int = 64, progress: bool = False):
        """Logits (float32) of images (paths or RGB uint8 arrays; a uint8 NHWC array or tensor is a batch of
        images like any other: prepared first). On CPU with a bundle whose ``inference_bf16`` is set, the
        batch runs in bf16 and every image whose top-two probabilities lie closer than ``bf16_guard`` is
        run again in fp32 (:func:`~leukoscope.models.precision.bf16_check`). ``self.last_fp32_rechecked``
        counts the images of the last call that were run again."""
        return self.logits_prepared(self.prepare(images, um_per_px), batch_size=batch_size, progress=progress)

    def logits_prepared(self, x, batch_size: int = 64, progress: bool = False):
        """:meth:`logits` of images already through :meth:`prepare` (uint8 NHWC)."""
        out = forward(self, x, batch_size=batch_size, progress=progress, backend=self.backend)
        self.last_fp32_rechecked = out.fp32_rechecked
        return out.logits

    def predict_proba(self, images, um_per_px=None, batch_size: int = 64, calibrated: bool = True,
                      progress: bool = False, tta: bool = False) -> np.ndarray:
        """Class probabilities ``(n, len(classes))`` of images (paths or RGB uint8 arrays, prepared by the
        bundle's pipeline); temperature-scaled unless ``calibrated=False``.

        ``tta=True``: the mean of the probabilities over the 8 rotations by 90° and mirror images
        of each input (:func:`~leukoscope.models.pipeline.dihedral_views`); 8x the compute."""
        return self.predict_proba_prepared(self.prepare(images, um_per_px), batch_size=batch_size,
                                           calibrated=calibrated, progress=progress, tta=tta)

    def predict_proba_prepared(self, x, batch_size: int = 64, calibrated: bool = True, progress: bool = False,
                               tta: bool = False) -> np.ndarray:
        """:meth:`predict_proba` of images already through :meth:`prepare` (uint8 NHWC)."""
        out = forward(self, x, batch_size=batch_size, progress=progress, tta=tta, backend=self.backend)
        self.last_fp32_rechecked = out.fp32_rechecked
        return out.probabilities(self.temperature if calibrated else 1.0)

    def to(self, device: str) -> "ModelBundle":
        self.model.to(device)
        self.device = str(device)
        return self


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or infinite value."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _nonfinite_message(file, bad: list[str]) -> str:
    return (f"{file}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): the model is broken (a diverged training run?); retrain it")


def _state_for_file(model) -> dict:
    sd = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def make_meta(*, classes: Sequence[str], model: str, input_size: int, mean, std, um_per_px, temperature: float = 1.0,
              config: dict | None = None, fingerprint: str | None = None, metrics: dict | None = None,
              **extra) -> dict:
    """Assemble and check bundle metadata (classes must be taxonomy classes in taxonomy order)."""
    classes = list(classes)
    for c in classes:
        taxonomy.check_class(c)
    order = [taxonomy.class_index(c) for c in classes]
    if order != sorted(order):
        raise ValueError(f"classes must be in taxonomy order, got {classes}")
    meta = {
        "format": FORMAT,
        "classes": classes,
        "model": model,
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "um_per_px": None if um_per_px is None else float(um_per_px),
        "temperature": float(temperature),
        "config": config or {},
        "fingerprint": fingerprint,
        "metrics": metrics or {},
        "versions": library_versions(),
        "intended_use": INTENDED_USE,
    }
    meta.update(extra)
    meta[PIPELINE_KEY] = Pipeline.from_meta(meta).to_dict()
    return meta


def save_bundle(model, meta: dict, path: str | os.PathLike) -> Path:
    """Write weights + metadata atomically to ``path`` (a ``.safetensors`` file)."""
    for key in ("classes", "model", "input_size", "mean", "std", "temperature"):
        if key not in meta:
            raise ValueError(f"bundle metadata lacks {key!r}")
    meta = {**meta, PIPELINE_KEY: Pipeline.from_meta(meta).to_dict()}  # as the fields say (Pipeline.from_meta)
    text = json.dumps(meta, default=_json_default, allow_nan=True)
    state = _state_for_file(model)
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(_nonfinite_message(path, bad) + "; not written")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: text})
    return Path(path)


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a bundle, without loading its weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.is_dir():
        cand = path / "model.safetensors"
        if cand.exists():
            path = cand
        else:
            raise NotABundleError(f"{path} is a folder without model.safetensors; give the model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:
        raise NotABundleError(
            f"{path} is not a LeukoScope model bundle (not a readable .safetensors file: {exc}); "
            "give the model.safetensors written by 'leukoscope train' or 'leukoscope cv'") from None
    if META_KEY not in header:
        raise NotABundleError(
            f"{path} is a .safetensors file but not a LeukoScope model bundle (no '{META_KEY}' metadata); "
            "give the model.safetensors written by 'leukoscope train' or 'leukoscope cv'")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise NotABundleError(f"{path}: LeukoScope metadata is not valid JSON ({exc})") from None
    check_meta(meta, path)
    meta["_file"] = str(path)
    return meta


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def check_meta(meta, path: str | os.PathLike = "<bundle>") -> None:
    """Check the fields every bundle's metadata needs (types and ranges, not the weights); a bad one
    raises :class:`NotABundleError` naming ``path`` and the field."""
    def bad(field: str, why: str):
        raise NotABundleError(f"{path}: bundle metadata field {field!r} {why}; the file is damaged or not written "
                              "by LeukoScope")

    if not isinstance(meta, dict):
        bad("(all)", f"is a JSON {type(meta).__name__}, not an object")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and taxonomy.is_class(c)
                                                                 for c in classes):
        bad("classes", f"must be a non-empty list of taxonomy classes, got {str(classes)[:80]}")
    if len(set(classes)) != len(classes):
        bad("classes", "lists a class twice")
    if not isinstance(meta.get("model"), str):
        bad("model", "must be a model name")
    size = meta.get("input_size")
    if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 4096):
        bad("input_size", f"must be a whole number of pixels (1-4096), got {str(size)[:40]}")
    for key, positive in (("mean", False), ("std", True)):
        v = meta.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_number(x) and (x > 0 or not positive) for x in v)):
            bad(key, f"must be 3 {'positive ' if positive else ''}numbers, got {str(v)[:60]}")
    t = meta.get("temperature")
    if t is not None and not (_number(t) and t > 0):
        bad("temperature", f"must be a positive number, got {str(t)[:40]}")
    um = meta.get("um_per_px")
    if um is not None and not (_number(um) and um > 0):
        bad("um_per_px", f"must be a positive number or null, got {str(um)[:40]}")
    config = meta.get("config")
    if config is not None and not (isinstance(config, dict)
                                   and isinstance(config.get("model_kwargs") or {}, dict)):
        bad("config", "must be an object (with model_kwargs an object)")
    if meta.get(PIPELINE_KEY) is not None and not isinstance(meta[PIPELINE_KEY], dict):
        bad(PIPELINE_KEY, "must be an object")


def load_bundle(path: str | os.PathLike, device: str = "cpu") -> ModelBundle:
    """Load a bundle (no pickle: safetensors only). Raises :class:`NotABundleError` naming the file,
    also when a weight tensor holds a NaN or infinite value."""
    meta = read_meta(path)
    file = meta.pop("_file")
    kwargs = (meta.get("config") or {}).get("model_kwargs") or {}
    try:  # the metadata's fields are checked; whatever else does not fit is a damaged file, named as such
        model = create_model(meta["model"], num_classes=len(meta["classes"]), input_size=meta["input_size"], **kwargs)
        state = load_file(file)
        missing, unexpected = model.load_state_dict(state, strict=False)
        Pipeline.from_meta(meta)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, OverflowError,
            safetensors.SafetensorError) as exc:
        raise NotABundleError(f"{file}: not a usable LeukoScope model bundle ({type(exc).__name__}: "
                              f"{str(exc)[:300]})") from None
    bad = nonfinite_tensors(state)
    if bad:
        raise NotABundleError(_nonfinite_message(file, bad))
    if missing or unexpected:
        raise NotABundleError(f"{file}: weights do not fit model {meta['model']!r} "
                              f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")

    model = model.to(device)
    if meta.get("channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    return ModelBundle(model, meta, path=file, device=device)
