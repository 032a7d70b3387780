"""The screening engine: smear images in, a reviewed differential count out.

:class:`ScreenEngine` holds a model bundle and the settings; :meth:`ScreenEngine.screen`
runs each smear through

    scales of all smears (given, the file's metadata, or red cells pooled per folder or
    source: :mod:`leukoscope.screen.scale`) -> open (tiled for scans) -> per tile: detect ->
    keep cells whose centre is in the tile's core -> crop at the model's field of view
    (padded with the field's background, never mirrored) [-> the cell's native-resolution
    crop for people, written to ``out_dir/crops``] -> classify (temperature-calibrated) -> checkpoint

and then refers low-confidence cells, cells whose model input is mostly outside the field, and
cells that look unlike the training data (the bundle's out-of-distribution reference:
``ood_score``/``ood_flag``, summed up per field and per run under ``ood`` in the summary), to an
``unidentified`` group and counts. ``workers`` threads read and analyse tiles at once while the
calling thread writes crops, classifies and checkpoints them in order; detection looks for
candidate nuclei at reduced resolution and runs the detector only around those whose cell the
tile owns (:func:`leukoscope.screen.detect.detect_leukocytes_fast`; ``fast=False``: over every
tile's whole region); cells are classified in batches across tiles and images. Memory holds
``workers`` + 1 tile regions and one batch of crops, whatever the scan's size.
:meth:`ScreenResult.write` writes ``cells.csv``, ``summary.json`` and ``review.html``
atomically. Every image is screened on its own: a file that cannot be read, a field
without leukocytes or an absurd scale ends as a clear error or an empty result in
the summary, and the other images are still screened.

With ``out_dir`` given, each finished tile is appended to
``out_dir/checkpoint/<image>.jsonl``; a screen that was interrupted skips the tiles
already done when it is run again with the same model, settings and files. Many scans, each
into a folder of its own with a run index: :func:`leukoscope.screen.batch.screen_batch`.

>>> from leukoscope.models.bundle import load_bundle        # doctest: +SKIP
>>> engine = ScreenEngine(load_bundle("model.safetensors"))  # doctest: +SKIP
>>> result = engine.screen(["smear1.tif"], out_dir="out")    # doctest: +SKIP
>>> result.summary["overall"]["blast_pct"]                   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from leukoscope import INTENDED_USE, taxonomy
from leukoscope.imaging.images import ImageError
from leukoscope.evaluate.predictions import write_table
from leukoscope.imaging.scale_policy import FieldScale, ScalePolicy, check_um_per_px
from leukoscope.io import atomic_write_json, atomic_write_text
from leukoscope.models.inference import finite_rows, forward
from leukoscope.models.ood import (COLOUR_ON_INPUT, NO_REFERENCE_NOTE, REFERENCE_KEY, colour_basis, colour_features,
                                   ood_summary, reference_threshold, score_cells)
from leukoscope.progress import tqdm
from leukoscope.screen.count import UNIDENTIFIED, count_summary
from leukoscope.screen.crops import (MAX_PADDING_FRACTION, background_colour, model_crops, model_fov_um,
                                     padding_fractions, write_native_crops)
from leukoscope.screen.detect import (DETECTION_COLUMNS, DetectParams, StainCalibration, box_iou, calibrate,
                                      detect_leukocytes, detect_leukocytes_fast, work_factor)
from leukoscope.screen.review import write_review
from leukoscope.screen.scale import screen_scales
from leukoscope.screen.tiles import Smear, Tile, open_smear, smear_from_array, tile_grid

#: Default referral threshold on the calibrated top-class probability. With a
#: temperature-calibrated model the top probability estimates the chance that the
#: call is right; below 0.5 the call is more likely wrong than right, so counting it
#: would add more error than information: such cells go to a person instead.
DEFAULT_REFER_BELOW = 0.5
#: ``refer_reason`` of cells referred for a calibrated top probability below ``refer_below``.
REFER_LOW_CONFIDENCE = "low confidence"
#: ``refer_reason`` of cells referred because they look unlike the training data (``ood_flag``).
REFER_OOD = "out of distribution"
#: Default tile (core) size in pixels for reading large scans.
DEFAULT_TILE_SIZE = 2048
#: Threads that read and analyse tiles at once (the machine's cores, at most 2: a third gains little because
#: classification and crop writing run beside them in the calling thread).
DEFAULT_DETECT_WORKERS = max(1, min(2, os.cpu_count() or 1))
CHECKPOINT_FORMAT = "leukoscope-screen-checkpoint/1"
#: ``refer_reason`` of cells whose model input is mostly padding (outside the field).
REFER_OUTSIDE = "mostly outside the field"


class ScreenWarning(UserWarning):
    """Something the user should know about a screen (e.g. an estimated scale)."""


@dataclass
class ImageResult:
    """The screen of one smear image."""

    image: str
    status: str                       # "ok" or "error"
    error: str | None = None
    width: int | None = None
    height: int | None = None
    um_per_px: float | None = None
    um_per_px_source: str | None = None
    scale_source: str | None = None        # given | ome | tiff_tag | file_dpi | pooled_estimate | field_estimate
    scale_field_estimate: float | None = None   # the field's own red-cell estimate (when measured)
    scale_group: str | None = None         # the pool of fields it shares its scale with
    warnings: list[str] = field(default_factory=list)
    tiles: int = 0
    tiles_resumed: int = 0
    duplicates_removed: int = 0
    cells: pd.DataFrame | None = None

    def info(self) -> dict:
        return {k: getattr(self, k) for k in ("image", "status", "error", "width", "height", "um_per_px",
                                              "um_per_px_source", "scale_source", "scale_field_estimate",
                                              "scale_group", "warnings", "tiles", "tiles_resumed",
                                              "duplicates_removed")}


@dataclass
class ScreenResult:
    """All images of a screen: the cell table, the summary and per-image results."""

    cells: pd.DataFrame
    summary: dict
    images: list[ImageResult]
    classes: tuple[str, ...]

    def write(self, out_dir: str | os.PathLike, bundle=None, review: bool = True, **review_kwargs) -> dict[str, Path]:
        """Write ``cells.csv``, ``summary.json`` and (with the bundle) ``review.html`` atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"cells": write_table(self.cells, out / "cells.csv"),
                 "summary": atomic_write_json(self.summary, out / "summary.json")}
        if review:
            paths["review"] = write_review(self, out / "review.html", bundle=bundle, **review_kwargs)
        return paths


def cell_columns(classes: Sequence[str]) -> list[str]:
    """Columns of ``cells.csv`` for a model with ``classes``."""
    return (["image", "x0", "y0", "x1", "y1", "pred", "confidence", "p_blast", "p_atypical"]
            + [f"prob_{c}" for c in classes]
            + ["model_pred", "referred", "refer_reason", "ood_score", "ood_flag", "cx", "cy", "nucleus_um2",
               "cell_um2", "tile", "pad_frac", "scale_source", "crop_native"])


class ScreenEngine:
    """Screen smears with a model bundle.

    ``bundle``: a :class:`leukoscope.models.bundle.ModelBundle` (anything with ``meta``,
    ``classes`` and ``predict_proba_prepared(x, batch_size=..., calibrated=True)`` for model inputs
    already through its pipeline, :func:`leukoscope.screen.crops.model_crops`).
    ``um_per_px``: the smears' scale, overriding the files' metadata (None: from the file,
    else estimated from the red cells of all smears of a folder or source, pooled, with a warning:
    :meth:`screen_scales`). ``refer_below``: cells whose calibrated
    top probability is below it are ``unidentified``; so are cells that look unlike the training
    data (``ood_flag``, :func:`leukoscope.models.ood.score_cells`) when the bundle stores an
    out-of-distribution reference, and cells whose model input is mostly padding (``refer_reason``:
    ``low confidence``, ``out of distribution``, ``mostly outside the field``). ``fast``: detect by
    :func:`leukoscope.screen.detect.detect_leukocytes_fast` (candidates at reduced resolution, the
    detector run only around them and only for cells a tile owns) instead of running
    :func:`~leukoscope.screen.detect.detect_leukocytes` over every tile's whole read region; the same
    settings, the same cells. ``workers``: threads that read and detect tiles at once (default
    :data:`DEFAULT_DETECT_WORKERS`); the cells and their order do not depend on it.
    """

    def __init__(self, bundle, refer_below: float = DEFAULT_REFER_BELOW, tile_size: int = DEFAULT_TILE_SIZE,
                 um_per_px: float | None = None, params: DetectParams | None = None, batch_size: int = 64,
                 progress: bool = True, fast: bool = True, workers: int | None = None):
        if not (0.0 <= float(refer_below) <= 1.0):
            raise ValueError(f"refer_below must be a probability in [0, 1], got {refer_below}")
        if int(tile_size) < 256:
            raise ValueError(f"tile size must be at least 256 px, got {tile_size}")
        self.bundle = bundle
        self.refer_below = float(refer_below)
        self.tile_size = int(tile_size)
        self.um_per_px = None if um_per_px is None else check_um_per_px(um_per_px, "--um-per-px")
        self.params = params or DetectParams()
        self.batch_size = int(batch_size)
        self.progress = progress
        self.fast = bool(fast)
        self.workers = DEFAULT_DETECT_WORKERS if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.meta = dict(bundle.meta)
        self.classes = tuple(bundle.classes)
        for c in self.classes:
            taxonomy.check_class(c)
        self.fov_um = model_fov_um(self.meta)

    # ------------------------------------------------------------------ settings

    def overlap_px(self, um_per_px: float) -> int:
        """Tile overlap: at least the largest cell diameter and half the crop's field of view."""
        return int(math.ceil(max(self.params.max_cell_um, self.fov_um / 2 + 1.0) / um_per_px))

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be reused (model, detector, tiling)."""
        key = {"model": {k: self.meta.get(k) for k in ("model", "classes", "input_size", "um_per_px", "temperature",
                                                      "fingerprint", "metrics")},
               "params": self.params.to_dict(), "tile_size": self.tile_size}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ scale

    def resolve_scale(self, smear: Smear) -> tuple[float, str, list[str]]:
        """µm/px for a smear by the scale policy: the engine's override, the file's metadata, or an estimate
        from red cells with a warning (:meth:`leukoscope.imaging.scale_policy.ScalePolicy.resolve_field`)."""
        um, src, notes, estimated = ScalePolicy(given=self.um_per_px, estimate="group").resolve_field(
            smear.um_per_px, smear.um_source, smear.sample)
        if estimated:
            warnings.warn(f"{smear.path}: {notes[-1]}", ScreenWarning, stacklevel=3)
        return um, src, notes

    # ------------------------------------------------------------------ one image

    def screen_scales(self, sources: Sequence, labels: Sequence[str], groups: Sequence[str] | None = None
                      ) -> tuple[list[FieldScale], dict]:
        """Scales of all ``sources`` at once, red-cell estimates pooled per folder (or per ``groups``)
        (:func:`leukoscope.screen.scale.screen_scales`); the pools go to ``summary.json`` (``scale``)."""
        return screen_scales(sources, labels, ScalePolicy(given=self.um_per_px, estimate="group"), groups)

    def screen_image(self, source, checkpoint_dir: str | os.PathLike | None = None, name: str | None = None) -> ImageResult:
        """Screen one smear (a path, or an RGB array). Errors become an ``error`` result, never an exception
        (except ``KeyboardInterrupt``: finished tiles are in the checkpoint)."""
        queue = _ClassifyQueue(self)
        state = self._start_image(source, checkpoint_dir, name, queue)
        queue.flush()
        return self._finish_image(state)

    def screen(self, sources: Iterable, out_dir: str | os.PathLike | None = None, names: Sequence[str] | None = None,
               groups: Sequence[str] | None = None) -> ScreenResult:
        """Screen several smears (paths or arrays); with ``out_dir``, tiles are checkpointed there and each
        cell's native-resolution crop is written to ``out_dir/crops``.

        Smears without a stated scale share one red-cell estimate per folder, or per ``groups`` (one name
        per smear, e.g. ``--source``): :meth:`screen_scales`. Cells are classified in batches of
        ``batch_size`` across tiles and images (one forward pass per cell would cost far more on a CPU).
        """
        sources = list(sources)
        ck_dir = Path(out_dir) / "checkpoint" if out_dir is not None else None
        labels = [names[i] if names is not None else _label(src) for i, src in enumerate(sources)]
        scales, pools = self.screen_scales(sources, labels, groups)
        queue = _ClassifyQueue(self)
        it = enumerate(sources)
        if self.progress and len(sources) > 1:
            it = tqdm(it, desc="smears", unit="image", total=len(sources))
        states = [self._start_image(src, ck_dir, labels[i], queue, scale=scales[i], out_dir=out_dir) for i, src in it]
        queue.flush()
        result = self.assemble([self._finish_image(st) for st in states])
        result.summary["scale"] = pools
        return result

    def _start_image(self, source, checkpoint_dir, name, queue: "_ClassifyQueue", scale: FieldScale | None = None,
                     out_dir: str | os.PathLike | None = None) -> "_ImageState":
        """Open, scale (``scale``: from :meth:`screen_scales`, else this smear's own) and detect one smear tile
        by tile; its crops go to ``queue`` for classification, its native crops to ``out_dir/crops``."""
        label = name or _label(source)
        st = _ImageState(ImageResult(image=label, status="ok"))
        smear = None
        try:
            smear = smear_from_array(source, None, label) if isinstance(source, np.ndarray) else open_smear(source)
            st.res.height, st.res.width = smear.shape
            if scale is None or scale.code == "given":  # given: this smear's own note if it overrides the file's
                um, src, notes = self.resolve_scale(smear)
                code = "given" if self.um_per_px is not None else (smear.um_code or "field_estimate")
                scale = FieldScale(um, code, src, notes, group=scale.group if scale is not None else None)
            elif scale.error:
                raise ValueError(scale.error)
            else:
                for note in scale.notes if scale.code in ("pooled_estimate", "field_estimate") else []:
                    warnings.warn(note if smear.path in note else f"{smear.path}: {note}", ScreenWarning,
                                  stacklevel=3)
            um = scale.um_per_px
            st.res.um_per_px, st.res.um_per_px_source, st.res.scale_source = um, scale.source, scale.code
            st.res.scale_group = scale.group
            own = scale.field_um_per_px
            st.res.scale_field_estimate = float(own) if own is not None and np.isfinite(own) else None
            st.res.warnings.extend(scale.notes)
            if out_dir is not None:
                key = hashlib.sha256(label.encode()).hexdigest()[:8]
                st.crops_sub = f"crops/{Path(label).stem[:40]}-{key}"
                st.out_dir = Path(out_dir)
            self._detect_tiles(smear, um, st, checkpoint_dir, queue)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one image must not lose the others
            st.fail(exc)
        finally:
            if smear is not None:
                smear.close()
        return st

    def _detect_tiles(self, smear: Smear, um: float, st: "_ImageState", checkpoint_dir, queue) -> None:
        align = work_factor(um, self.params)
        tiles = tile_grid(smear.height, smear.width, self.tile_size, self.overlap_px(um), align)
        st.res.tiles = len(tiles)
        st.ck = _Checkpoint.open(checkpoint_dir, smear, um, self.fingerprint()) if checkpoint_dir else None
        cal = st.ck.calibration if st.ck is not None else None
        sample = smear.sample()
        if cal is None:
            cal = calibrate(sample, um, self.params)
            if st.ck is not None:
                st.ck.set_calibration(cal)
        background = background_colour(sample)  # the padding colour of this smear's crops
        del sample
        done = st.ck.done if st.ck is not None else {}
        st.res.tiles_resumed = sum(1 for t in tiles if t.index in done)
        st.frames.update({t.index: done[t.index] for t in tiles if t.index in done})
        todo = [t for t in tiles if t.index not in done]
        bar = None
        if self.progress and len(tiles) > 1:
            bar = tqdm(desc=Path(smear.path).name, unit="tile", initial=st.res.tiles_resumed, total=len(tiles))
        # ``workers`` threads each read and analyse a tile (the decoders and most of numpy / scikit-image
        # release the GIL) while this thread writes crops, classifies and checkpoints the tiles in order;
        # at most workers + 1 tile regions are held at a time, whatever the scan's size
        stop = threading.Event()

        def read_and_detect(tile: Tile):
            if stop.is_set():  # an earlier tile failed or the run was interrupted: start nothing new
                return None
            try:
                region = smear.read(*tile.read)
                det, crops = self.detect_tile(smear, tile, um, cal, region=region, background=background)
                if not det.empty and st.out_dir is not None:  # cut from the region in memory: no second decode
                    det["crop_native"] = write_native_crops(_region_reader(smear, tile.read, region), smear.shape,
                                                            det[["x0", "y0", "x1", "y1"]].to_numpy(),
                                                            um, background, st.out_dir, st.crops_sub)
                return det, crops
            except BaseException:
                stop.set()
                raise

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="leukoscope-detect")
        inflight: deque = deque()
        try:
            tiles_iter = iter(todo)
            for tile in tiles_iter:
                inflight.append((tile, pool.submit(read_and_detect, tile)))
                if len(inflight) > self.workers:
                    break
            while inflight:
                tile, fut = inflight.popleft()
                det, crops = fut.result()
                nxt = next(tiles_iter, None)
                if nxt is not None:
                    inflight.append((nxt, pool.submit(read_and_detect, nxt)))
                if det.empty:
                    st.tile_done(tile.index, self._empty_cells())
                else:
                    queue.add(st, tile.index, det, crops)
                if bar is not None:
                    bar.update(1)
        except BaseException:
            stop.set()
            for _, fut in inflight:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()

    def detect_tile(self, smear: Smear, tile: Tile, um: float, cal: StainCalibration, region: np.ndarray | None = None,
                    background=None):
        """Detections whose centre lies in ``tile``'s core, and their model inputs (padded with ``background``
        where they leave the field; ``pad_frac``: the padded fraction of each); ``region``: the tile's read
        region when already read."""
        ry0, rx0, ry1, rx1 = tile.read
        if region is None:
            region = smear.read(ry0, rx0, ry1, rx1)
        if self.fast:
            cy0, cx0, cy1, cx1 = tile.core
            det = detect_leukocytes_fast(region, um, self.params, calibration=cal, offset=(rx0, ry0),
                                         within=(cy0 - ry0, cx0 - rx0, cy1 - ry0, cx1 - rx0))
        else:
            det = detect_leukocytes(region, um, self.params, calibration=cal, offset=(rx0, ry0))
        if not det.empty:
            det = det[[tile.owns(cx, cy) for cx, cy in zip(det.cx, det.cy)]].reset_index(drop=True)
        if det.empty:
            return det, None
        det["tile"] = tile.index
        det["pad_frac"] = padding_fractions(smear.shape, list(zip(det.cx, det.cy)), um, self.meta)
        return det, model_crops(region, list(zip(det.cx - rx0, det.cy - ry0)), um, self.meta, background)

    def classify(self, crops: np.ndarray) -> np.ndarray:
        """Temperature-calibrated class probabilities of model inputs (crops through the bundle's pipeline)."""
        return self.classify_cells(crops)[0]

    def classify_cells(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`classify` and, when the bundle stores an out-of-distribution reference, each crop's
        OOD score (:func:`leukoscope.models.ood.score_cells`: penultimate features and crop colour), else ``None``."""
        if not (self.meta.get(REFERENCE_KEY) and hasattr(self.bundle, "model")):
            probs = self.bundle.predict_proba_prepared(crops, batch_size=self.batch_size, calibrated=True)
            return np.asarray(probs, dtype=np.float64), None
        out = forward(self.bundle, crops, batch_size=self.batch_size, features=True,
                      backend=getattr(self.bundle, "backend", "auto"))
        colour = None  # a reference whose colour was measured on whole images cannot judge crops: features only
        if colour_basis(self.meta[REFERENCE_KEY]) == COLOUR_ON_INPUT:
            colour = np.asarray([colour_features(c) for c in crops]).reshape(len(crops), 6)
        return (np.asarray(out.probabilities(self.bundle.temperature), dtype=np.float64),
                score_cells(self.bundle, out.features, colour).score)

    def ood_summary(self, cells: pd.DataFrame) -> dict:
        """``{flagged, total, fraction, median_score, threshold, warning}`` of some cells
        (:func:`leukoscope.models.ood.ood_summary`), or a ``note`` when the bundle has no reference."""
        ref = self.meta.get(REFERENCE_KEY)
        if not ref or not hasattr(self.bundle, "model"):
            return {"note": NO_REFERENCE_NOTE, "warning": None}
        scored = cells[cells["ood_score"].notna()] if "ood_score" in cells else cells.iloc[:0]
        thr = reference_threshold(ref, str(getattr(self.bundle, "path", None) or "the bundle"))
        return ood_summary(scored["ood_flag"].to_numpy(dtype=bool), scored["ood_score"].to_numpy(dtype=np.float64),
                           thr)

    def _finish_image(self, st: "_ImageState") -> ImageResult:
        res = st.res
        if res.status == "ok":
            frames = [f for _, f in sorted(st.frames.items()) if not f.empty]
            cells = pd.concat(frames, ignore_index=True) if frames else self._empty_cells()
            kept, res.duplicates_removed = dedupe_across_tiles(cells)
            if res.duplicates_removed and st.out_dir is not None and "crop_native" in cells:
                # the native crops of the dropped duplicates: no row points to them any more
                for rel in set(cells["crop_native"].dropna()) - set(kept["crop_native"].dropna()):
                    if rel:
                        (st.out_dir / rel).unlink(missing_ok=True)
            cells = kept
            cells.insert(0, "image", res.image)
            cells["scale_source"] = res.scale_source
            res.cells = cells.sort_values(["y0", "x0"], kind="stable").reset_index(drop=True)
            if res.cells.empty:
                res.warnings.append("no leukocytes found in this field")
        else:
            res.cells = None
        if res.error and res.image not in res.error:
            res.error = f"{res.image}: {res.error}"
        return res

    def _empty_cells(self) -> pd.DataFrame:
        cols = DETECTION_COLUMNS + ["tile"] + [f"prob_{c}" for c in self.classes]
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})

    def assemble(self, results: list[ImageResult]) -> ScreenResult:
        """Apply referral, build the cell table and the summary."""
        frames = [self.finish_cells(r.cells) for r in results if r.status == "ok" and r.cells is not None]
        frames = [f for f in frames if not f.empty]
        cells = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cell_columns(self.classes))
        cells = cells[cell_columns(self.classes)]
        per_image = []
        for r in results:
            entry = r.info()
            if r.status == "ok":
                sub = cells[cells.image == r.image]
                entry.update(count_summary(sub.pred.tolist(), sub.p_blast.to_numpy(), self.classes))
                entry["ood"] = self.ood_summary(sub)
                if entry["ood"].get("warning"):
                    entry["warnings"] = [*entry["warnings"], entry["ood"]["warning"]]
            per_image.append(entry)
        ok = [r for r in results if r.status == "ok"]
        overall = count_summary(cells.pred.tolist(), cells.p_blast.to_numpy(), self.classes)
        overall["ood"] = self.ood_summary(cells)
        overall.update({"images": len(results), "images_ok": len(ok), "images_failed": len(results) - len(ok),
                        "cells_nonfinite": int(cells["confidence"].isna().sum())})  # referred: no call
        summary = {
            "intended_use": INTENDED_USE,
            "model": {"file": getattr(self.bundle, "path", None), "name": self.meta.get("model"),
                      "classes": list(self.classes), "input_size": self.meta.get("input_size"),
                      "um_per_px": self.meta.get("um_per_px"), "field_of_view_um": round(self.fov_um, 3),
                      "temperature": self.meta.get("temperature")},
            "settings": {"refer_below": self.refer_below, "tile_size": self.tile_size,
                         "um_per_px_override": self.um_per_px, "detector": self.params.to_dict()},
            "overall": overall,
            "ood": overall["ood"],
            "images": per_image,
            "errors": [{"image": r.image, "error": r.error} for r in results if r.status != "ok"],
        }
        return ScreenResult(cells.reset_index(drop=True), summary, results, self.classes)

    def finish_cells(self, cells: pd.DataFrame | None) -> pd.DataFrame:
        """Add prediction, confidence, P(blast), P(atypical) and the referral to a detection+probability table."""
        if cells is None or cells.empty:
            return pd.DataFrame(columns=cell_columns(self.classes))
        cells = cells.copy()
        for col, default in (("pad_frac", 0.0), ("crop_native", ""), ("scale_source", "")):
            cells[col] = cells[col].fillna(default) if col in cells else default
        probs = cells[[f"prob_{c}" for c in self.classes]].to_numpy(dtype=np.float64)
        finite = finite_rows(probs)  # NaN/inf probabilities: referred, no call (confidence NaN)
        top = probs.argmax(axis=1)
        conf = np.where(finite, probs.max(axis=1), np.nan)
        cells["model_pred"] = [self.classes[i] if f else UNIDENTIFIED for i, f in zip(top, finite)]
        cells["confidence"] = conf
        outside = cells["pad_frac"].to_numpy(dtype=np.float64) > MAX_PADDING_FRACTION
        # NaN/inf probabilities are no call (referred as low confidence, confidence NaN)
        low = ~finite | (conf < self.refer_below)
        if "ood_score" in cells and cells["ood_score"].notna().any():
            cells["ood_flag"] = (cells["ood_score"] > 1.0).to_numpy()
        else:
            cells["ood_score"], cells["ood_flag"] = np.nan, pd.array([pd.NA] * len(cells), dtype="boolean")
        shifted = cells["ood_flag"].fillna(False).to_numpy(dtype=bool)
        # a model input that is mostly padding is not a cell the model can judge: referred whatever it says
        cells["referred"] = low | shifted | outside
        cells["refer_reason"] = [";".join(r for r, on in ((REFER_OUTSIDE, out), (REFER_LOW_CONFIDENCE, lo),
                                                          (REFER_OOD, sh)) if on)
                                 for out, lo, sh in zip(outside, low, shifted)]
        cells["pred"] = np.where(cells["referred"], UNIDENTIFIED, cells["model_pred"])
        cells["p_blast"] = taxonomy.binary_scores(probs, self.classes, "blast")
        cells["p_atypical"] = taxonomy.binary_scores(probs, self.classes, "atypical")
        for c in ("x0", "y0", "x1", "y1", "tile"):
            cells[c] = cells[c].astype(int)
        return cells


class _ImageState:
    """One image in flight: its result, its checkpoint and its finished tiles."""

    def __init__(self, res: ImageResult):
        self.res = res
        self.ck: _Checkpoint | None = None
        self.frames: dict[int, pd.DataFrame] = {}
        self.out_dir: Path | None = None     # the result folder (native crops), when one is written
        self.crops_sub = ""

    def tile_done(self, index: int, df: pd.DataFrame) -> None:
        self.frames[index] = df
        if self.ck is not None:
            self.ck.append(index, df)

    def fail(self, exc: BaseException) -> None:
        known = (ImageError, ValueError, OSError, MemoryError)
        self.res.status = "error"
        self.res.error = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"


class _ClassifyQueue:
    """Detected cells waiting for the model, classified ``batch_size`` at a time across tiles and images."""

    def __init__(self, engine: "ScreenEngine"):
        self.engine = engine
        self.items: list[tuple[_ImageState, int, pd.DataFrame, np.ndarray]] = []
        self.n = 0

    def add(self, st: _ImageState, index: int, det: pd.DataFrame, crops: np.ndarray) -> None:
        self.items.append((st, index, det, crops))
        self.n += len(crops)
        if self.n >= self.engine.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items, self.n = self.items, [], 0
        try:
            probs, ood = self.engine.classify_cells(np.concatenate([c for _, _, _, c in items]))
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            for st, _, _, _ in items:
                if st.res.status == "ok":
                    st.fail(RuntimeError(f"classification failed: {type(exc).__name__}: {exc}"))
            return
        i = 0
        for st, index, det, crops in items:
            df = det.copy()
            p = probs[i:i + len(crops)]
            i += len(crops)
            for k, c in enumerate(self.engine.classes):
                df[f"prob_{c}"] = p[:, k]
            if ood is not None:
                df["ood_score"] = ood[i - len(crops):i]
            if st.res.status == "ok":
                st.tile_done(index, df)


def _label(source) -> str:
    return str(source) if not isinstance(source, np.ndarray) else "<array>"


def _region_reader(smear: Smear, read_box: tuple[int, int, int, int], region: np.ndarray):
    """``read(y0, x0, y1, x1)`` served from a tile's read ``region`` where it lies inside, else from the smear."""
    ry0, rx0, ry1, rx1 = read_box

    def read(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        if ry0 <= y0 and rx0 <= x0 and y1 <= ry1 and x1 <= rx1:
            return region[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
        return smear.read(y0, x0, y1, x1)

    return read


def dedupe_across_tiles(cells: pd.DataFrame, iou: float = 0.5) -> tuple[pd.DataFrame, int]:
    """Drop detections from different tiles that overlap (IoU >= ``iou``), keeping the first.

    The core-ownership rule already counts each cell once; this is the safety net for a
    cell whose box came out slightly different in two tiles. Returns the table and how many were removed.
    """
    if len(cells) < 2 or "tile" not in cells or cells["tile"].nunique() < 2:
        return cells, 0
    boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
    tiles = cells["tile"].to_numpy()
    m = box_iou(boxes, boxes)
    drop = np.zeros(len(cells), bool)
    for i in range(len(cells)):
        if drop[i]:
            continue
        dup = (m[i] >= iou) & (tiles != tiles[i]) & ~drop
        dup[: i + 1] = False
        drop |= dup
    return cells[~drop].reset_index(drop=True), int(drop.sum())


# ---------------------------------------------------------------------- checkpoint


class _Checkpoint:
    """Per-image JSON-lines checkpoint: a header, then one line per finished tile."""

    def __init__(self, path: Path, header: dict, done: dict, calibration):
        self.path = path
        self.header = header
        self.done = done
        self.calibration = calibration

    @classmethod
    def open(cls, directory, smear: Smear, um: float, fingerprint: str) -> "_Checkpoint":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        p = Path(smear.path)
        try:
            st = p.stat()
            ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            ident = {}
        key = hashlib.sha256(str(p.resolve() if p.exists() else smear.path).encode()).hexdigest()[:12]
        path = directory / f"{p.stem[:40]}-{key}.jsonl"
        header = {"format": CHECKPOINT_FORMAT, "image": smear.path, "file": ident, "shape": list(smear.shape),
                  "um_per_px": um, "engine": fingerprint}
        done, cal = {}, None
        if path.exists():
            done, cal = cls._read(path, header)
        if not done and cal is None:
            atomic_write_text(json.dumps(header) + "\n", path)
        return cls(path, header, done, cal)

    @staticmethod
    def _read(path: Path, header: dict):
        done, cal = {}, None
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            first = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            first = {}
        if first != header:
            return {}, None  # another file, scale or engine: start afresh
        valid = lines[:1]
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by the interruption: redo from there
            valid.append(line)
            if "calibration" in rec:
                cal = StainCalibration(**rec["calibration"])
            elif "tile" in rec:
                done[int(rec["tile"])] = pd.DataFrame(rec["cells"], columns=rec["columns"])
        if len(valid) < len(lines):  # drop the cut line so that new tiles append cleanly (atomically:
            atomic_write_text("\n".join(valid) + "\n", path)  # a crash now must not lose the valid tiles)
        return done, cal

    def set_calibration(self, cal: StainCalibration) -> None:
        self._append({"calibration": cal.to_dict()})
        self.calibration = cal

    def append(self, index: int, df: pd.DataFrame) -> None:
        self._append({"tile": int(index), "columns": list(df.columns),
                      "cells": json.loads(df.to_json(orient="values", double_precision=15))})

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
