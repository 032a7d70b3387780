"""A trained model as one ``.safetensors`` file: weights plus LeukoScope metadata.

The metadata JSON lives under the safetensors header key ``leukoscope``: classes
(taxonomy order), model name, input_size, mean, std, um_per_px at the model input,
temperature, the effective config, the training-data fingerprint, validation
metrics, library versions and the intended use. Loading never unpickles.

>>> b = load_bundle("runs/pbc/model.safetensors")          # doctest: +SKIP
>>> b.classes[:2], b.meta["temperature"]                    # doctest: +SKIP
(('BAS', 'EBO'), 1.31)
>>> p = b.predict_proba(["cell.png"])                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from leukoscope import INTENDED_USE, __version__, taxonomy
from leukoscope.models.preprocess import dihedral_views, normalize, prepare_image
from leukoscope.models.registry import create_model

META_KEY = "leukoscope"
FORMAT = "leukoscope-bundle/1"


class NotABundleError(ValueError):
    """The file is not a LeukoScope model bundle."""


def library_versions() -> dict:
    import torch
    import torchvision

    import safetensors

    return {"leukoscope": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "safetensors": getattr(safetensors, "__version__", "?"), "numpy": np.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- running a model


def autocast_context(device, bf16: bool):
    """bf16 autocast on CPU when asked; AMP (bf16, else fp16) on CUDA; nothing otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def forward_logits(model, x_uint8, mean, std, *, batch_size: int = 64, device="cpu", bf16: bool = False,
                   channels_last: bool = True, progress: bool = False):
    """Logits (float32, on CPU) of ``model`` for a uint8 NHWC batch of prepared images."""
    import torch

    model.eval()
    outs = []
    rng = range(0, len(x_uint8), batch_size)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="predicting", unit="batch", leave=False)
    with torch.inference_mode():
        for i in rng:
            xb = normalize(torch.as_tensor(x_uint8[i:i + batch_size]).to(device), mean, std)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, bf16):
                outs.append(model(xb).float().cpu())
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


#: Top-two probability margin below which a bf16 call is re-run in fp32, for bundles that do not
#: record their own (``bf16_guard``, measured by :func:`bf16_check` at training time).
DEFAULT_BF16_GUARD = 0.05
#: bf16 inference is switched on only when at most this fraction of validation images needs the fp32 re-run.
MAX_BF16_RECHECK = 0.25


def _top2_margin(z):
    """Difference of the two largest softmax probabilities per row (uncalibrated logits ``z``)."""
    import torch

    top = torch.softmax(z.double(), 1).topk(min(2, z.shape[1]), dim=1).values
    return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)


def bf16_check(z32, z16, *, safety: float = 2.0, min_guard: float = 0.01,
               max_recheck: float = MAX_BF16_RECHECK) -> dict:
    """Decide whether a model may run in bf16 on CPU, from fp32 and bf16 logits of the same images.

    bf16's call ``a`` differs from fp32's only if, for some class ``c``, bf16 moved the gap
    ``p[a] - p[c]`` by more than bf16's own gap, which is at least its top-two margin. So the
    quantity to bound is the largest such move over the images (``max_gap_shift``; at most twice
    the largest single probability shift, ``max_abs_prob_diff``, and usually much less because the
    two probabilities move together). The guard is that bound times ``safety`` (at least
    ``min_guard``); images whose bf16 top-two margin is under it are re-run in fp32 by
    :meth:`ModelBundle.logits`. bf16 is worth it (``inference_bf16``) when the re-run images are at
    most ``max_recheck`` of the set and, with the re-run, every call equals fp32's.
    """
    import torch

    z32, z16 = torch.as_tensor(z32).float(), torch.as_tensor(z16).float()
    if len(z32) == 0:
        return {"inference_bf16": False, "bf16_guard": DEFAULT_BF16_GUARD, "reason": "no images to check on"}
    p32, p16 = torch.softmax(z32.double(), 1), torch.softmax(z16.double(), 1)
    max_dp = float((p32 - p16).abs().max())
    d = p16 - p32
    a = p16.argmax(1, keepdim=True)
    max_gap_shift = float((d.gather(1, a) - d).abs().max())
    guard = max(min_guard, safety * max_gap_shift)
    near = _top2_margin(z16) < guard
    cascade = torch.where(near[:, None], z32, z16)
    agree = float((cascade.argmax(1) == z32.argmax(1)).float().mean())
    agree_plain = float((z16.argmax(1) == z32.argmax(1)).float().mean())
    frac = float(near.float().mean())
    ok = agree == 1.0 and frac <= max_recheck
    reason = "" if ok else (f"{frac:.0%} of the images lie within the guard {guard:.3g} of a tie (more than "
                            f"{max_recheck:.0%}: bf16 would not pay)" if agree == 1.0 else
                            f"bf16 with fp32 re-runs still changed {1 - agree:.1%} of the calls")
    return {"inference_bf16": bool(ok), "bf16_guard": float(guard), "n": int(len(z32)),
            "max_abs_prob_diff": max_dp, "max_gap_shift": max_gap_shift, "recheck_fraction": frac,
            "agreement_bf16_alone": agree_plain, "agreement_with_recheck": agree, "reason": reason}


# --------------------------------------------------------------------------- the bundle


class ModelBundle:
    """A loaded model with its metadata; ``model`` is in eval mode."""

    def __init__(self, model, meta: dict, path: str | None = None, device: str = "cpu"):
        self.model = model.eval()
        self.meta = meta
        self.path = path
        self.device = device
        self.last_fp32_rechecked = 0  # images of the last logits() call re-run in fp32 (bf16 bundles)

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

    # preprocessing: the same two steps as the training cache
    def prepare(self, images, um_per_px=None) -> np.ndarray:
        """Images (arrays or paths) -> uint8 ``(N, S, S, 3)`` at the model's size and scale."""
        from leukoscope.imaging.images import load_rgb

        images = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
        ums = _per_image(um_per_px, len(images))
        out = np.empty((len(images), self.input_size, self.input_size, 3), dtype=np.uint8)
        for i, (img, um) in enumerate(zip(images, ums)):
            if isinstance(img, (str, os.PathLike)):
                img = load_rgb(img)
            out[i] = prepare_image(np.asarray(img), self.input_size, self.um_per_px, um,
                                   white_balance=self.white_balance)
        return out

    def preprocess(self, images, um_per_px=None):
        """Images (arrays or paths) -> normalised float NCHW tensor ready for ``model``."""
        return normalize(self.prepare(images, um_per_px), self.mean, self.std)

    def logits(self, images, um_per_px=None, batch_size: int = 64, progress: bool = False):
        """Logits (float32). On CPU with a bundle whose ``inference_bf16`` is set, the batch runs in bf16
        and every image whose top-two probabilities lie closer than ``bf16_guard`` is run again in
        fp32 (:func:`bf16_check`): bf16's speed where the call is clear, fp32's answer where it is close.
        ``self.last_fp32_rechecked`` counts the images of the last call that were run again."""
        import torch

        x = images if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8) else self.prepare(images, um_per_px)
        bf16 = bool(self.meta.get("inference_bf16")) and self.device == "cpu"
        z = forward_logits(self.model, x, self.mean, self.std, batch_size=batch_size, device=self.device,
                           bf16=bf16, channels_last=True, progress=progress)
        self.last_fp32_rechecked = 0
        if bf16 and z.numel():
            near = torch.nonzero(_top2_margin(z) < float(self.meta.get("bf16_guard", DEFAULT_BF16_GUARD)))[:, 0]
            if len(near):
                z[near] = forward_logits(self.model, x[near.numpy()] if isinstance(x, np.ndarray) else x[near],
                                         self.mean, self.std, batch_size=batch_size, device=self.device,
                                         bf16=False, channels_last=True)
                self.last_fp32_rechecked = int(len(near))
        return z

    def predict_proba(self, images, um_per_px=None, batch_size: int = 64, calibrated: bool = True,
                      progress: bool = False, tta: bool = False) -> np.ndarray:
        """Class probabilities ``(n, len(classes))``; temperature-scaled unless ``calibrated=False``.

        ``tta=True``: the mean of the probabilities over the 8 rotations by 90° and mirror images
        of each input (:func:`~leukoscope.models.preprocess.dihedral_views`); 8x the compute."""
        import torch

        if tta:  # one batch of images at a time, all 8 views of it: one progress bar, 1x the memory
            x = images if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8) \
                else torch.from_numpy(self.prepare(images, um_per_px))
            out = np.zeros((len(x), len(self.classes)))
            step = max(1, int(batch_size))
            starts = range(0, len(x), step)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="predicting (TTA x8)", unit="batch", leave=False)
            for s in starts:
                views = dihedral_views(x[s:s + step])
                out[s:s + len(views[0])] = sum(self.predict_proba(v, batch_size=batch_size, calibrated=calibrated)
                                               for v in views) / len(views)
            return out
        z = self.logits(images, um_per_px, batch_size=batch_size, progress=progress)
        if z.numel() == 0:
            return np.zeros((0, len(self.classes)))
        if calibrated:
            z = z / self.temperature
        return torch.softmax(z.double(), dim=1).numpy()

    def to(self, device: str) -> "ModelBundle":
        self.model.to(device)
        self.device = str(device)
        return self


def _per_image(um_per_px, n: int) -> list:
    if um_per_px is None or isinstance(um_per_px, (int, float, np.floating)):
        return [um_per_px] * n
    ums = list(um_per_px)
    if len(ums) != n:
        raise ValueError(f"um_per_px has {len(ums)} values for {n} images")
    return ums


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
    return meta


def save_bundle(model, meta: dict, path: str | os.PathLike) -> Path:
    """Write weights + metadata atomically to ``path`` (a ``.safetensors`` file)."""
    from safetensors.torch import save_file

    from leukoscope.io import _json_default, atomic_path

    for key in ("classes", "model", "input_size", "mean", "std", "temperature"):
        if key not in meta:
            raise ValueError(f"bundle metadata lacks {key!r}")
    text = json.dumps(meta, default=_json_default, allow_nan=True)
    with atomic_path(path) as tmp:
        save_file(_state_for_file(model), str(tmp), metadata={META_KEY: text})
    return Path(path)


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a bundle, without loading its weights."""
    from safetensors import safe_open

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
    meta["_file"] = str(path)
    return meta


def load_bundle(path: str | os.PathLike, device: str = "cpu") -> ModelBundle:
    """Load a bundle (no pickle: safetensors only). Raises :class:`NotABundleError` naming the file."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    file = meta.pop("_file")
    kwargs = (meta.get("config") or {}).get("model_kwargs") or {}
    model = create_model(meta["model"], num_classes=len(meta["classes"]), input_size=meta["input_size"], **kwargs)
    state = load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NotABundleError(f"{file}: weights do not fit model {meta['model']!r} "
                              f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    import torch

    model = model.to(device)
    if meta.get("channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    return ModelBundle(model, meta, path=file, device=device)
