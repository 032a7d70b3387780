"""Everything of the review that touches a model: a cell's model input and its saliency map.

This is the review's one door to the models, through the one inference path:
:func:`leukoscope.models.bundle.load_bundle`, the bundle's preprocessing pipeline (the screen's
:func:`leukoscope.screen.crops.model_crops`, or :meth:`ModelBundle.prepare` for a predict run's
image), :func:`leukoscope.models.inference.forward` (``inputs=True``: the very tensor the model
classifies) and :func:`leukoscope.evaluate.saliency.saliency_map` on that tensor.
The bundle is loaded once, on the first request, from the file the run names; without
it the views say why they are missing (the rest of the review works without a model).

The model input of a cell is cut from its ORIGINAL smear at the model's field of view,
centred on the cell, by the screen's own :func:`leukoscope.screen.crops.model_crops` (which runs
the bundle's pipeline): the same input the screen classified (a predict run's cell: its image file, prepared as ``predict_paths`` does). When the smear image is no longer where the run
found it, the cell's stored crop is used instead (reflected at its edges where it is
smaller than the field of view), and :meth:`ModelViews.model_input` says so.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from leukoscope.evaluate.saliency import saliency_map
from leukoscope.models.bundle import load_bundle
from leukoscope.models.inference import forward
from leukoscope.review.importer import png_bytes
from leukoscope.screen.crops import crop_size_px, model_crops, model_fov_um
from leukoscope.screen.tiles import open_smear


#: Model inputs kept in memory (the most recently shown cells).
CACHE_CELLS = 256


class ModelUnavailable(RuntimeError):
    """No model to compute a view with (no file recorded, file missing or unreadable)."""


class ModelViews:
    """Model input and saliency PNGs of a store's cells, from the run's model file (or ``model_path``)."""

    def __init__(self, store, model_path: str | None = None):
        self.store = store
        self.model_path = model_path or store.run.get("model_file")
        self._bundle = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, tuple[np.ndarray, str]] = OrderedDict()

    def bundle(self):
        with self._lock:
            if self._bundle is None:
                if not self.model_path:
                    raise ModelUnavailable("this run does not name its model file; reopen with --model FILE")
                if not Path(self.model_path).is_file():
                    raise ModelUnavailable(f"{self.model_path}: model file not found; reopen with --model FILE")
                try:
                    self._bundle = load_bundle(self.model_path)
                except ValueError as exc:
                    raise ModelUnavailable(str(exc)) from None
            return self._bundle

    def warm(self) -> None:
        """Load the bundle now (e.g. in a background thread at start-up) so that the first view is quick;
        a missing model is reported when a view is asked for."""
        try:
            self.bundle()
        except ModelUnavailable:
            pass

    def _input(self, cell_id: int) -> tuple[np.ndarray, str]:
        """The prepared (S, S, 3) uint8 model input of a cell and a note on where it was cut from."""
        if cell_id in self._cache:
            self._cache.move_to_end(cell_id)
            return self._cache[cell_id]
        bundle = self.bundle()
        c = self.store.cell(cell_id)
        um = c["um_per_px"]
        crop = np.asarray(Image.open(io.BytesIO(self.store.crop_png(cell_id))).convert("RGB"))
        if self.store.run["kind"] == "screen" and um:
            side = crop_size_px(model_fov_um(bundle.meta), um)
            region, origin = self._smear_region(c["image"], c["cx"], c["cy"], side)
            note = "cut from the original smear"
            if region is None:
                region, origin = crop, (c["crop_x0"], c["crop_y0"])
                note = "smear image not found: cut from the stored crop (reflected beyond it)"
            # the screen's own step: its crop at the model's field of view through the bundle's pipeline
            x = model_crops(region, [(c["cx"] - origin[0], c["cy"] - origin[1])], um, bundle.meta)[0]
        else:  # a predict run: the image file, prepared as predict_paths prepares it
            x, note = bundle.prepare([crop], um)[0], "the image file"
        self._cache[cell_id] = (x, note)
        if len(self._cache) > CACHE_CELLS:
            self._cache.popitem(last=False)
        return x, note

    def _smear_region(self, image: str, cx: float, cy: float, side: int):
        field = self.store.field(image)
        path = Path(field["path"]) if field is not None else Path(image)
        if not path.exists():
            return None, None
        try:
            smear = open_smear(path)
        except ValueError:
            return None, None
        with smear:
            x0, y0 = max(0, int(cx - side)), max(0, int(cy - side))
            x1, y1 = min(smear.width, int(cx + side)), min(smear.height, int(cy + side))
            return smear.read(y0, x0, y1, x1), (x0, y0)

    def model_input(self, cell_id: int) -> tuple[bytes, str]:
        """PNG of the cell's model input and a note on its origin."""
        x, note = self._input(int(cell_id))
        return png_bytes(x), note

    def saliency(self, cell_id: int) -> bytes:
        """PNG of the saliency map (|gradient| of the model's top class) over a grey copy of the input."""
        bundle = self.bundle()
        x, _ = self._input(int(cell_id))
        target = list(bundle.classes).index(self.store.cell(cell_id)["model_pred"])
        with self._lock:
            tensor = forward(bundle, x[None], inputs=True).inputs  # the tensor the model classifies
            sal = saliency_map(bundle.model, tensor, target)[0]
        return png_bytes(overlay(sal, x))


def overlay(sal: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Saliency in yellow-to-red over the image in grey (99th percentile = full strength)."""
    top = float(np.percentile(sal, 99)) if sal.size else 0.0
    s = np.clip(sal / top, 0.0, 1.0)[..., None] if top > 0 else np.zeros(sal.shape + (1,))
    grey = img.astype(np.float64).mean(axis=2, keepdims=True) * 0.6
    heat = np.concatenate([np.full_like(s, 255.0), 255.0 * (1 - s), np.zeros_like(s)], axis=2)
    return np.clip(grey * (1 - s) + heat * s, 0, 255).astype(np.uint8)
