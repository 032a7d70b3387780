"""Teaching a trained model a new lab: :func:`adapt` (``leukoscope adapt``).

Labelled (the default): the bundle is fine-tuned on the lab's own labelled cells (any
dataset ``train`` reads, e.g. the review station's ``export-labels`` folder), with a
class-stratified sample of the parent's training cells replayed beside them (``replay_table``)
so that the first lab is not forgotten; every epoch draws its images balanced over
(source, class). The lab may bring classes the parent never saw: the classifier grows new
rows and keeps the old ones (:func:`leukoscope.models.heads.grow_head`); the parent's classes
stay in the model even where neither the lab nor the replay has them. ``k_per_class`` takes
at most K cells per class of the lab (seeded). The validation cells (temperature, best epoch)
are drawn from the lab's cells only, never from the replay; the out-of-distribution reference
is fitted on all the lab's cells used. The lab's µm/px follows the parent's scale mode
(estimated from the red cells per source with ``scale="estimate"``).

Unlabelled (``unlabelled=True``, AdaBN): every BatchNorm layer's running statistics are
re-estimated on the lab's cells, prepared exactly as for prediction (white balance, scale);
all weights stay as they were. The temperature is kept; the parent's OOD reference, which
described the parent's features, is dropped (fit one later from labelled lab cells with
``leukoscope evaluate --fit-reference``).

Either way the bundle's metadata gains ``lineage``::

    {"parent_sha256", "parent_name", "parent_model", "mode": "labelled" | "unlabelled",
     "adaptation_fingerprint", "n_lab", "k_per_class": {class: n}, "replay": {"n", "fingerprint",
     "per_class"} | None, "new_classes", "validation": {"n", "source"}, "date"}

>>> from leukoscope.data import read_dataset
>>> lab = read_dataset("export_folder").table                       # doctest: +SKIP
>>> replay = read_dataset("../shared/data/pbc").table               # doctest: +SKIP
>>> r = adapt("runs/pbc/model.safetensors", lab, "runs/pbc+lab", replay_table=replay, k_per_class=10)  # doctest: +SKIP
>>> r.meta["lineage"]["k_per_class"]                                # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from leukoscope import taxonomy
from leukoscope.imaging.scale_policy import check_um_per_px
from leukoscope.io import atomic_write_json
from leukoscope.models.bundle import load_bundle, read_meta, save_bundle
from leukoscope.models.heads import body_batchnorms
from leukoscope.models.ood import REFERENCE_KEY, fit_training_reference
from leukoscope.models.pipeline import normalize
from leukoscope.models.pretrained import file_sha256
from leukoscope.train.checkpoint import holds_run_lock
from leukoscope.train.config import TrainConfig
from leukoscope.train.loop import resolve_training_scale, table_fingerprint
from leukoscope.train.trainer import Trainer

#: Defaults of a labelled adaptation, sized for K = 10 cells per class in well under 5 minutes on
#: 2 CPU cores: 8 epochs of 40 images per class (half lab, half replay) are a few hundred steps.
#: One epoch trains the grown head alone; then the whole network at lr 3e-3 (on the demo's lab B,
#: measured: 0.74 accuracy after K = 10 against 0.53 with lr 1e-3 and the body at 0.5x, the first
#: lab's accuracy 0.77 against 0.79). BatchNorm statistics follow the lab (not frozen).
ADAPT_DEFAULTS = dict(epochs=8, per_class=40, batch_size=32, lr=3e-3, warmup_epochs=0.5, head_warmup_epochs=1,
                      body_lr_scale=1.0, freeze_bn=False, val_fraction=0.2, patience=1000)
#: Replayed cells of the parent's training data per class (class-stratified sample).
REPLAY_PER_CLASS = 50
#: ``source`` given to lab cells whose table has none.
LAB_SOURCE = "lab"


@dataclass
class AdaptResult:
    out: Path
    bundle_path: Path
    meta: dict
    lab_used: pd.DataFrame                    # the lab's cells used (after K per class)
    replay_used: pd.DataFrame | None = None   # the parent's cells replayed
    validation_paths: list[str] = field(default_factory=list)
    log: pd.DataFrame | None = None

    @property
    def lineage(self) -> dict:
        return self.meta["lineage"]


def _bundle_file(model_path) -> Path:
    return Path(read_meta(model_path)["_file"])


def take_k_per_class(table: pd.DataFrame, k: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``k`` rows per label (a seeded random choice), in table order; all rows when ``k`` is None."""
    if k is None:
        return table.reset_index(drop=True)
    if int(k) != k or k < 1:
        raise ValueError(f"k per class must be a positive integer, got {k!r}")
    rng = np.random.default_rng([int(seed), 0xADA97])
    keep = []
    for _, idx in sorted(table.groupby("label").indices.items()):
        keep.extend(idx[rng.permutation(len(idx))[: int(k)]].tolist())
    return table.iloc[sorted(keep)].reset_index(drop=True)


def replay_sample(table: pd.DataFrame, per_class: int, classes, seed: int = 0) -> pd.DataFrame:
    """A class-stratified sample of the parent's training cells: up to ``per_class`` of each of ``classes``."""
    table = table[table["label"].isin(set(classes))]
    return take_k_per_class(table, per_class, seed + 1)


def _with_source(table: pd.DataFrame, default: str) -> pd.DataFrame:
    table = table.copy()
    if "source" not in table:
        table["source"] = default
    table["source"] = table["source"].astype("string").fillna(default).astype(str)
    return table


def _lineage(parent_meta: dict, parent_file: Path, mode: str, lab: pd.DataFrame, **extra) -> dict:
    return {"parent_sha256": file_sha256(parent_file), "parent_name": parent_file.parent.name,
            "parent_file": str(parent_file), "parent_model": parent_meta.get("model"), "mode": mode,
            "adaptation_fingerprint": table_fingerprint(lab), "n_lab": int(len(lab)),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}


@holds_run_lock
def adapt(model_path: str | os.PathLike, lab_table: pd.DataFrame, out: str | os.PathLike, *,
          replay_table: pd.DataFrame | None = None, replay_per_class: int = REPLAY_PER_CLASS,
          k_per_class: int | None = None, seed: int = 0, epochs: int | None = None, per_class: int | None = None,
          lr: float | None = None, unlabelled: bool = False, um_per_px: float | None = None,
          overrides: dict | None = None,
          progress: bool = False, log: Callable[[str], None] = print) -> AdaptResult:
    """Adapt the bundle ``model_path`` to a lab; the adapted bundle is written to ``out/model.safetensors``.

    ``lab_table``: the lab's cells (``path``, ``label`` [, ``source``, ``um_per_px``]); with
    ``unlabelled=True`` only ``path`` is needed. ``replay_table``: the parent's training data
    (a sample of ``replay_per_class`` per class is replayed); without it a warning says that
    forgetting the first lab is not guarded against. ``k_per_class``: at most K lab cells per
    class (with fewer than 3 lab cells in every class no validation cells are held out and the
    parent's temperature is kept). ``epochs``, ``per_class``, ``lr`` and ``overrides`` (any other
    :class:`~leukoscope.train.config.TrainConfig` setting, e.g. ``threads``) change
    :data:`ADAPT_DEFAULTS`. ``um_per_px``: the µm/px of every lab image (checked by
    :func:`~leukoscope.imaging.scale_policy.check_um_per_px`); it becomes the lab table's stated
    ``um_per_px``, which the scale policy uses before any estimate, as for ``train``'s data (the
    replay keeps its own). Everything else (model, input, augmentation, scale mode, white
    balance) is the parent's. See the module docstring for what is fitted on what. ``out`` is locked
    meanwhile (:func:`leukoscope.train.checkpoint.run_lock`: a second process is refused).
    """
    if um_per_px is not None:
        um_per_px = check_um_per_px(um_per_px, "adapt(um_per_px=...)")
        lab_table = lab_table.assign(um_per_px=um_per_px)
    parent_file = _bundle_file(model_path)
    parent_meta = read_meta(parent_file)
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise ValueError(f"{out} already holds a model; choose a new --out or delete {out / 'model.safetensors'}")
    if unlabelled:
        return _adapt_unlabelled(parent_file, parent_meta, lab_table, out, log=log)
    if "label" not in lab_table:
        raise ValueError("labelled adaptation needs a 'label' column in the lab's table (or unlabelled=True)")
    lab = take_k_per_class(_with_source(lab_table, LAB_SOURCE), k_per_class, seed)
    if len(lab) == 0:
        raise ValueError("the lab's table holds no cells")
    lab_sources = set(lab["source"])
    parent_classes = list(parent_meta["classes"])
    replay = None
    if replay_table is not None:
        replay = replay_sample(_with_source(replay_table, "replay"), replay_per_class, parent_classes, seed)
        clash = set(replay["source"]) & lab_sources
        if clash:  # the same source name in both: keep them apart for balancing and the scale estimate
            replay["source"] = ["replay:" + s if s in clash else s for s in replay["source"]]
        dup = set(replay["path"].astype(str)) & set(lab["path"].astype(str))
        if dup:
            raise ValueError(f"{len(dup)} cells are both in the lab's data and in the replayed training data, "
                             f"e.g. {sorted(dup)[0]}; adapt on cells the parent was not trained on")
        log(f"replaying {len(replay)} cells of the parent's training data ({replay_per_class} per class at most)")
    else:
        msg = ("no replay data (--replay): the parent's training cells are not replayed, so forgetting its first "
               "lab is NOT guarded against")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log(f"warning: {msg}")
    k_used = {c: int(n) for c, n in lab["label"].value_counts().items()}
    k_used = {c: k_used[c] for c in taxonomy.CLASSES if c in k_used}
    new_classes = [c for c in k_used if c not in parent_classes]
    log(f"adapting {parent_file} on {len(lab)} lab cells ({', '.join(f'{c} {n}' for c, n in k_used.items())})"
        + (f"; new classes: {', '.join(new_classes)}" if new_classes else ""))

    base = TrainConfig.from_dict(parent_meta.get("config") or {})
    settings = {**ADAPT_DEFAULTS, **{k: v for k, v in dict(epochs=epochs, per_class=per_class, lr=lr).items()
                                     if v is not None}, **(overrides or {})}
    cfg = TrainConfig.from_dict({**base.to_dict(), **settings, "init_from": str(parent_file), "seed": seed,
                                 "pretrained": False, "balance_by": "source_class", "ood_reference": False,
                                 "input_size": parent_meta["input_size"], "preset": base.preset})
    table = pd.concat([lab, replay], ignore_index=True) if replay is not None else lab
    trainer = Trainer(table, out, cfg, progress=progress, log=log, resume=False,
                      classes=parent_classes, val_sources=lab_sources)
    res = trainer.fit()
    val_table = trainer.table.iloc[trainer.va_idx]
    lab_done = trainer.table[trainer.table["source"].isin(lab_sources)]
    meta = dict(res.meta)
    if len(val_table) == 0:  # too few lab cells per class (< 3) to hold any out: keep the parent's calibration
        meta["temperature"] = float(parent_meta.get("temperature") or 1.0)
        log("warning: no lab cells to validate on (fewer than 3 per class); the parent's temperature is kept")
    if base.ood_reference:  # fitted here on all the lab's cells, not by the trainer on its few validation cells
        ref = fit_training_reference(trainer.model, meta, res.bundle_path, lab_done, trainer.device, log, seed)
        meta.pop(REFERENCE_KEY, None)
        if ref is not None:
            meta[REFERENCE_KEY] = ref
        meta["config"] = {**meta["config"], "ood_reference": True}
    meta["lineage"] = _lineage(
        parent_meta, parent_file, "labelled", lab, k_per_class=k_used, k_requested=k_per_class,
        new_classes=new_classes,
        replay=None if replay is None else {"n": int(len(replay)), "fingerprint": table_fingerprint(replay),
                                            "per_class": int(replay_per_class)},
        validation={"n": int(len(val_table)), "sources": sorted(set(val_table["source"]))},
        lab_scale={s: v for s, v in meta.get("training_scale", {}).get("sources", {}).items() if s in lab_sources})
    save_bundle(trainer.model, meta, res.bundle_path)
    atomic_write_json(meta, out / "metadata.json")
    m = meta.get("metrics", {})
    log(f"wrote {res.bundle_path}: {len(meta['classes'])} classes, lab validation balanced accuracy "
        f"{m.get('val_balanced_accuracy', float('nan')):.3f} on {len(val_table)} cells, "
        f"temperature {meta['temperature']:.3f}")
    return AdaptResult(out, res.bundle_path, meta, lab, replay, list(val_table["path"].astype(str)), res.log)


def _adapt_unlabelled(parent_file: Path, parent_meta: dict, lab_table: pd.DataFrame, out: Path, *,
                      log: Callable[[str], None]) -> AdaptResult:
    if "path" not in lab_table or len(lab_table) == 0:
        raise ValueError("unlabelled adaptation needs the lab's images (a table with a 'path' column, not empty)")
    lab = _with_source(lab_table[[c for c in ("path", "source", "um_per_px") if c in lab_table]], LAB_SOURCE)
    base = TrainConfig.from_dict(parent_meta.get("config") or {})
    bundle = load_bundle(parent_file)
    um = None
    scale_record = None
    if bundle.um_per_px:
        lab, scale_record = resolve_training_scale(lab, base.scale, log=log)
        um = pd.to_numeric(lab["um_per_px"], errors="coerce").to_numpy(dtype=float) if "um_per_px" in lab else None
        if um is not None:
            um = [None if not np.isfinite(v) else float(v) for v in um]
    x = bundle.prepare(list(lab["path"].astype(str)), um)
    n_bn = adabn(bundle.model, x, bundle.mean, bundle.std, device=bundle.device)
    log(f"re-estimated the statistics of {n_bn} BatchNorm layers on {len(x)} lab cells (AdaBN)")
    meta = {k: v for k, v in bundle.meta.items() if k != REFERENCE_KEY}
    meta["lineage"] = _lineage(parent_meta, parent_file, "unlabelled", lab.assign(label=""), k_per_class=None,
                               replay=None, new_classes=[], n_batchnorm=n_bn, lab_scale=scale_record)
    out.mkdir(parents=True, exist_ok=True)
    path = save_bundle(bundle.model, meta, out / "model.safetensors")
    atomic_write_json(meta, out / "metadata.json")
    log(f"wrote {path} (weights unchanged but the BatchNorm statistics; the parent's OOD reference dropped)")
    return AdaptResult(out, path, meta, lab)


@torch.no_grad()
def adabn(model: torch.nn.Module, x_uint8, mean, std, *, batch_size: int = 64, device="cpu") -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on ``x_uint8`` (``(N, S, S, 3)``
    prepared images), in place: the statistics become the plain average over the batches (equal
    to the exact mean when the images fit one batch); every other layer stays in eval mode and
    no weight changes. Returns the number of BatchNorm layers."""
    bns = body_batchnorms(model)
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer: nothing for AdaBN to re-estimate")
    if len(x_uint8) == 0:
        raise ValueError("AdaBN needs at least one image")
    model.eval()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches
        bn.train()
    try:
        for i in range(0, len(x_uint8), batch_size):
            xb = torch.as_tensor(np.asarray(x_uint8[i:i + batch_size]))
            model(normalize(xb, mean, std).to(device))
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        model.eval()
    return len(bns)
