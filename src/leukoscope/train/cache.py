"""Decode each image once per run into an in-memory uint8 array at the model's input.

>>> cache = build_cache(table, input_size=128, model_um_per_px=None)   # doctest: +SKIP
>>> cache.images.shape                                                  # doctest: +SKIP
torch.Size([4692, 128, 128, 3])
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from leukoscope.imaging.images import ImageError, load_rgb
from leukoscope.models.pipeline import prepare_image
from leukoscope.progress import tqdm


@dataclass
class ImageCache:
    """``images`` (N, S, S, 3) uint8 tensor, row ``i`` for ``paths[i]``; ``errors`` for files that failed."""

    images: "object"          # torch.Tensor uint8 NHWC
    paths: list[str]
    input_size: int
    model_um_per_px: float | None
    errors: list[dict] = field(default_factory=list)
    white_balance: bool = False

    def __post_init__(self):
        self._index = {p: i for i, p in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path) -> bool:
        return str(path) in self._index

    def rows(self, paths) -> np.ndarray:
        """Row numbers of ``paths`` (KeyError naming the first missing path)."""
        try:
            return np.array([self._index[str(p)] for p in paths], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"image not in the cache: {exc.args[0]}") from None

    def compatible(self, input_size: int, model_um_per_px, white_balance: bool = False) -> bool:
        a, b = self.model_um_per_px, model_um_per_px
        same_scale = (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b))
        return self.input_size == input_size and same_scale and bool(self.white_balance) == bool(white_balance)


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def build_cache(table: pd.DataFrame, input_size: int, model_um_per_px: float | None = None,
                workers: int | None = None, progress: bool = False, white_balance: bool = False) -> ImageCache:
    """Decode and prepare every ``table.path`` (using ``table.um_per_px`` when present;
    ``white_balance`` as in :func:`leukoscope.models.pipeline.prepare_image`).

    Images that fail to decode are left out and listed in ``errors`` (path, reason).
    """
    paths = [str(p) for p in table["path"]]
    ums = table["um_per_px"].tolist() if "um_per_px" in table else [None] * len(paths)
    out = np.empty((len(paths), input_size, input_size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    errors: list[dict] = []

    def work(i):
        try:
            img = load_rgb(paths[i])
            um = ums[i]
            um = None if um is None or (isinstance(um, float) and math.isnan(um)) else float(um)
            out[i] = prepare_image(img, input_size, model_um_per_px, um, white_balance=white_balance)
            return i, None
        except (ImageError, ValueError, OSError) as exc:
            return i, str(getattr(exc, "reason", exc))

    it = range(len(paths))
    n_workers = workers or _default_workers()
    bar = None
    if progress:
        bar = tqdm(total=len(paths), desc=f"decoding at {input_size}px", unit="img", leave=False)
    with ThreadPoolExecutor(max_workers=n_workers) as ex:
        for i, err in ex.map(work, it):
            if err is None:
                ok[i] = True
            else:
                errors.append({"path": paths[i], "reason": err})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    keep = np.flatnonzero(ok)
    images = torch.from_numpy(out[keep] if len(keep) < len(paths) else out)
    return ImageCache(images, [paths[i] for i in keep], input_size, model_um_per_px, errors, bool(white_balance))
