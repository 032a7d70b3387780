"""The one place where an image becomes a model input (training cache, predict, cv, screen).

Two steps, kept apart so that training can cache the first:

1. :func:`prepare_image` — ``(H, W, 3)`` uint8 -> ``(S, S, 3)`` uint8 at the model's
   scale (first white-balanced on its own background when the model was trained so,
   :func:`leukoscope.imaging.colour.white_balance`): when both the image's and the model's µm/px are known, resample with
   :func:`leukoscope.imaging.scale.to_scale` and centre-crop / reflect-pad to ``S``; otherwise
   resize the whole image to ``S x S``.
2. :func:`normalize` — uint8 NHWC/NCHW (or float in [0, 1]) -> float NCHW, ``(x - mean) / std``.

>>> import numpy as np
>>> prepare_image(np.zeros((360, 363, 3), np.uint8), 128).shape
(128, 128, 3)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from leukoscope.imaging.scale import center_crop_or_pad, to_scale


def _known(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x)) and x > 0


def prepare_image(img: np.ndarray, input_size: int, model_um_per_px: float | None = None,
                  image_um_per_px: float | None = None, *, white_balance: bool = False) -> np.ndarray:
    """Bring one RGB uint8 image to the model's input size (and physical scale when known);
    ``white_balance``: first :func:`leukoscope.imaging.colour.white_balance` on the whole image."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {img.shape} dtype {img.dtype}")
    if white_balance:
        from leukoscope.imaging.colour import white_balance as _wb

        img = _wb(img)
    s = int(input_size)
    if _known(model_um_per_px) and _known(image_um_per_px):
        img = to_scale(img, float(image_um_per_px), float(model_um_per_px))
        return center_crop_or_pad(img, s)
    if img.shape[0] == s and img.shape[1] == s:
        return np.ascontiguousarray(img)
    h, w = img.shape[:2]
    resample = Image.LANCZOS if (h > s or w > s) else Image.BILINEAR
    return np.asarray(Image.fromarray(img).resize((s, s), resample))


def dihedral_views(x) -> list:
    """The 8 rotations by 90° and mirror images of prepared uint8 NHWC images (tensor or array),
    the identity first: test-time augmentation for a model trained with rotations and flips.

    >>> import numpy as np
    >>> v = dihedral_views(np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1))
    >>> len(v), v[0][0, :, :, 0].tolist(), v[1][0, :, :, 0].tolist()
    (8, [[0, 1], [2, 3]], [[1, 3], [0, 2]])
    """
    import torch

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
    import torch

    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
