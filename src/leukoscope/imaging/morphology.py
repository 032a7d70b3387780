"""Morphology helpers shared by leukocyte detection (:mod:`leukoscope.screen.detect`) and the
red-cell scale estimate (:mod:`leukoscope.imaging.scale_estimate`).

>>> import numpy as np
>>> downsample(np.full((4, 6, 3), 255, np.uint8), 2).shape
(2, 3, 3)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2lab


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Block mean by an integer ``factor`` (edges: partial blocks dropped), float32 in [0, 1]."""
    img = np.asarray(img)
    if factor == 1:
        return img.astype(np.float32) / 255.0
    h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    if h == 0 or w == 0:
        return np.zeros((0, 0, 3), np.float32)
    if img.dtype == np.uint8 and factor <= 16:
        # integer block sums (exact: at most 256 values of 255 fit uint16), then the same float32 mean as
        # below, bit for bit, about nine times faster than a float reduction over two strided axes
        s = np.zeros((h // factor, w // factor) + img.shape[2:], np.uint16)
        for i in range(factor):
            for j in range(factor):
                s += img[i:h:factor, j:w:factor]
        return s.astype(np.float32) / np.float32(factor * factor) / 255.0
    a = img[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).astype(np.float32)
    return a.mean(axis=(1, 3)) / 255.0


def to_lab(rgb01: np.ndarray) -> np.ndarray:
    """CIELAB (float32) of an RGB float image in [0, 1]."""
    return rgb2lab(rgb01).astype(np.float32)


def remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop connected components (8-connected) with fewer than ``min_px`` pixels."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]
