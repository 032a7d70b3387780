"""The one place where an image becomes a model input: a composed, serialisable preprocessing pipeline.

A bundle stores its pipeline in its metadata (``meta["pipeline"]``, :meth:`Pipeline.to_dict`); a
bundle written before the pipeline existed gets the same steps from its ``white_balance``,
``um_per_px``, ``input_size``, ``mean`` and ``std`` fields (:meth:`Pipeline.from_meta`). The steps,
in the spirit of torchvision / MONAI transforms, each a small class with ``to_dict``:

1. :class:`WhiteBalance` — each channel divided by the image's own background colour
   (:func:`leukoscope.imaging.colour.white_balance`), when the model was trained so;
2. :class:`PhysicalScale` — resampled to the model's µm/px when both the image's and the
   model's are known (:func:`leukoscope.imaging.scale.to_scale`);
3. :class:`CropOrPad` — centre-crop / reflect-pad to ``S x S`` when the image is at the model's
   scale, otherwise the whole image resized to ``S x S``;
4. :class:`Normalize` — uint8 NHWC batch -> float NCHW, ``(x / 255 - mean) / std``.

Steps 1-3 work on one uint8 ``(H, W, 3)`` image (:meth:`Pipeline.prepare`; the training cache
stores their output), step 4 on a batch (:meth:`Pipeline.normalize`).

>>> import numpy as np
>>> p = Pipeline.build(128, um_per_px=0.29, white_balance=True, mean=(0.5,) * 3, std=(0.25,) * 3)
>>> [s["name"] for s in p.to_dict()["steps"]]
['white_balance', 'physical_scale', 'crop_or_pad', 'normalize']
>>> Pipeline.from_dict(p.to_dict()).prepare(np.zeros((360, 363, 3), np.uint8)).shape
(128, 128, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from leukoscope.imaging.colour import white_balance
from leukoscope.imaging.scale import center_crop_or_pad, to_scale

PIPELINE_KEY = "pipeline"


def _known(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x)) and x > 0


def _check_rgb(img) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {img.shape} dtype {img.dtype}")
    return img


# --------------------------------------------------------------------------- the steps
# Image steps take and return ``(img, um_per_px)``; ``um_per_px`` is the image's scale, or None when
# unknown. After PhysicalScale has resampled an image, its scale is the model's.


@dataclass(frozen=True)
class WhiteBalance:
    """The image divided per channel by its own background colour, brought to neutral 240."""

    name = "white_balance"

    def __call__(self, img: np.ndarray, um_per_px):
        return white_balance(img), um_per_px

    def to_dict(self) -> dict:
        return {"name": self.name}


@dataclass(frozen=True)
class PhysicalScale:
    """Resample to ``um_per_px`` (the model's) when the image's scale is known; otherwise nothing."""

    um_per_px: float | None
    name = "physical_scale"

    def __call__(self, img: np.ndarray, um_per_px):
        if _known(self.um_per_px) and _known(um_per_px):
            return to_scale(img, float(um_per_px), float(self.um_per_px)), float(self.um_per_px)
        return img, None

    def to_dict(self) -> dict:
        return {"name": self.name, "um_per_px": None if self.um_per_px is None else float(self.um_per_px)}


@dataclass(frozen=True)
class CropOrPad:
    """``size x size``: centre-crop / reflect-pad an image at the model's scale, else resize it whole."""

    size: int
    name = "crop_or_pad"

    def __call__(self, img: np.ndarray, um_per_px):
        s = int(self.size)
        if um_per_px is not None:
            return center_crop_or_pad(img, s), um_per_px
        if img.shape[0] == s and img.shape[1] == s:
            return np.ascontiguousarray(img), um_per_px
        h, w = img.shape[:2]
        resample = Image.LANCZOS if (h > s or w > s) else Image.BILINEAR
        return np.asarray(Image.fromarray(img).resize((s, s), resample)), um_per_px

    def to_dict(self) -> dict:
        return {"name": self.name, "size": int(self.size)}


@dataclass(frozen=True)
class Normalize:
    """uint8 NHWC (or NCHW) batch, or float NCHW in [0, 1] -> normalised float NCHW."""

    mean: tuple
    std: tuple
    name = "normalize"

    def __call__(self, x):
        return normalize(x, self.mean, self.std)

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}


_STEPS = {"white_balance": lambda d: WhiteBalance(),
          "physical_scale": lambda d: PhysicalScale(d.get("um_per_px")),
          "crop_or_pad": lambda d: CropOrPad(int(d["size"])),
          "normalize": lambda d: Normalize(tuple(d["mean"]), tuple(d["std"]))}


class Pipeline:
    """Image steps (uint8 image -> uint8 ``S x S`` model input) followed by :class:`Normalize`."""

    def __init__(self, steps: Sequence):
        steps = list(steps)
        if not steps or not isinstance(steps[-1], Normalize) or any(isinstance(s, Normalize) for s in steps[:-1]):
            raise ValueError("a preprocessing pipeline ends with its one normalize step")
        if not any(isinstance(s, CropOrPad) for s in steps):
            raise ValueError("a preprocessing pipeline needs a crop_or_pad step (the model's input size)")
        self.steps = steps

    @classmethod
    def build(cls, input_size: int, *, um_per_px: float | None = None, white_balance: bool = False,
              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> "Pipeline":
        """The standard pipeline: [white balance] -> physical scale -> crop/pad -> normalise."""
        steps = [WhiteBalance()] if white_balance else []
        return cls(steps + [PhysicalScale(um_per_px), CropOrPad(int(input_size)), Normalize(tuple(mean), tuple(std))])

    @classmethod
    def from_dict(cls, d: dict) -> "Pipeline":
        steps = []
        for s in d.get("steps", []):
            if s.get("name") not in _STEPS:
                raise ValueError(f"unknown preprocessing step {s.get('name')!r}; known: {', '.join(_STEPS)}")
            steps.append(_STEPS[s["name"]](s))
        return cls(steps)

    @classmethod
    def from_meta(cls, meta: dict) -> "Pipeline":
        """A bundle's pipeline. The metadata fields ``white_balance``, ``um_per_px``, ``input_size``, ``mean`` and
        ``std`` are its source: ``meta["pipeline"]`` is their serialised composition (written by ``make_meta``
        and ``save_bundle``), used as stored when it agrees with them and rebuilt when a field was edited after
        it was written; a bundle without it (written before the pipeline existed) gets the same steps."""
        built = cls.build(int(meta["input_size"]), um_per_px=meta.get("um_per_px"),
                          white_balance=bool(meta.get("white_balance", False)),
                          mean=meta.get("mean", (0.0, 0.0, 0.0)), std=meta.get("std", (1.0, 1.0, 1.0)))
        stored = meta.get(PIPELINE_KEY)
        if stored:
            pipe = cls.from_dict(stored)
            if pipe.to_dict() == built.to_dict():
                return pipe
        return built

    def to_dict(self) -> dict:
        return {"steps": [s.to_dict() for s in self.steps]}

    def _step(self, kind):
        return next((s for s in self.steps if isinstance(s, kind)), None)

    @property
    def input_size(self) -> int:
        return int(self._step(CropOrPad).size)

    @property
    def um_per_px(self) -> float | None:
        step = self._step(PhysicalScale)
        return None if step is None else step.um_per_px

    def with_model_scale(self, um_per_px: float) -> "Pipeline":
        """The same pipeline with the model scale ``um_per_px`` where it records none."""
        return Pipeline([PhysicalScale(um_per_px) if isinstance(s, PhysicalScale) and not _known(s.um_per_px)
                         else s for s in self.steps])

    def prepare(self, img: np.ndarray, um_per_px: float | None = None) -> np.ndarray:
        """One RGB uint8 ``(H, W, 3)`` image at scale ``um_per_px`` (None: unknown) -> ``(S, S, 3)`` uint8."""
        img = _check_rgb(img)
        um = float(um_per_px) if _known(um_per_px) else None
        for step in self.steps[:-1]:
            img, um = step(img, um)
        return img

    def normalize(self, x):
        """Prepared uint8 NHWC batch -> float NCHW model input."""
        return self.steps[-1](x)


def prepare_image(img: np.ndarray, input_size: int, model_um_per_px: float | None = None,
                  image_um_per_px: float | None = None, *, white_balance: bool = False) -> np.ndarray:
    """One RGB uint8 image through the standard pipeline's image steps (:meth:`Pipeline.build`)."""
    return Pipeline.build(input_size, um_per_px=model_um_per_px, white_balance=white_balance).prepare(
        img, image_um_per_px)


def dihedral_views(x) -> list:
    """The 8 rotations by 90° and mirror images of prepared uint8 NHWC images (tensor or array),
    the identity first: test-time augmentation for a model trained with rotations and flips.

    >>> import numpy as np
    >>> v = dihedral_views(np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1))
    >>> len(v), v[0][0, :, :, 0].tolist(), v[1][0, :, :, 0].tolist()
    (8, [[0, 1], [2, 3]], [[1, 3], [0, 2]])
    """
    t = torch.as_tensor(x)
    if t.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {tuple(t.shape)}")
    out = []
    for flip in (False, True):
        base = t.flip(2) if flip else t
        for k in range(4):
            out.append(base if k == 0 else torch.rot90(base, k, dims=(1, 2)))
    return out


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """uint8 (N, H, W, 3) or (N, 3, H, W) tensor/array, or float NCHW in [0, 1] -> normalised float NCHW."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
