"""Training as a recipe: :class:`Trainer` and the one-call :func:`train`.

>>> from leukoscope.data import read_dataset
>>> from leukoscope.train import train, preset
>>> ds = read_dataset("../shared/data/pbc")                                  # doctest: +SKIP
>>> result = train(ds.table, "runs/pbc_fast", preset("fast", epochs=3))      # doctest: +SKIP
>>> result.bundle_path, result.metrics["val_balanced_accuracy"]              # doctest: +SKIP

:meth:`Trainer.fit` reads as the recipe: resolve the config, resolve the images' physical
scale, decode them once, split off the validation images, build the model (from scratch, or
from a bundle with ``init_from``), run the epochs (balanced sampling, augmentation, a step per
batch, validation, early stopping, a checkpoint), take the best epoch's weights, fit the
temperature, decide bf16 inference, write the bundle and fit the out-of-distribution reference.

Outputs in ``out``: ``model.safetensors`` (the bundle), ``metadata.json`` (a copy of
its metadata), ``config.json`` (effective config, flat), ``log.csv`` (one row per epoch)
and, while training, ``checkpoint.pt`` (written atomically every epoch; a run that
finds it resumes from it; removed when the bundle is written). A run whose bundle
exists is not retrained (``resume=False``, the command line's ``--restart``: it is).

The run folder is locked while a run writes it (:func:`leukoscope.train.checkpoint.run_lock`:
a second process is refused, naming the holder's pid). The data's fingerprint (``data_fingerprint``,
else :func:`leukoscope.train.loop.table_fingerprint` of the table as given) is recorded in every
checkpoint and the bundle (``meta["fingerprint"]``); resuming or re-running a finished run with
other data or another config is an error (:class:`~leukoscope.train.checkpoint.RunMismatchError`).
A non-finite loss, validation loss or weight stops the run with
:class:`TrainingDivergedError`: no bundle is written and the last checkpoint (every epoch in
it finite) is kept.

Besides the weights, the bundle records the physical scale of the training images
(``meta["training_scale"]``: the table's µm/px, or with ``scale="estimate"`` the
red-cell estimate per source, :func:`leukoscope.train.loop.resolve_training_scale`) and, unless
``ood_reference=False``, the out-of-distribution reference fitted on the run's own
validation images (``meta["reference"]``), so that ``leukoscope evaluate`` warns about
shifted sources without an extra step.

Fine-tuning (the ``finetune`` group of :class:`~leukoscope.train.config.TrainConfig`):
``init_from`` starts from a bundle's weights (its classifier rows rearranged to the data's
classes by :func:`leukoscope.models.heads.grow_head`); the first ``head_warmup_epochs`` train
only the classifier (the body frozen, in eval mode); ``body_lr_scale`` scales the body's
learning rate; ``freeze_bn`` keeps the body's BatchNorm statistics fixed.

Pretrained weights: ``pretrained=True`` builds the model with the ImageNet weights its registry
entry names (:func:`leukoscope.models.registry.create_model`), normalises inputs with the
weights' mean/std (the registry config of such a model carries them) and records the weights in
``meta["pretrained"]`` (:func:`leukoscope.models.pretrained.weights_record`; with ``init_from``,
the parent bundle's record; ``None`` for a model trained from scratch).

Adaptation (:func:`leukoscope.train.adapt.adapt`) passes ``classes`` (the model's classes when
the table lacks some of them) and ``val_sources`` (validation images drawn only from those
sources: the lab's own cells, never the replayed ones).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from leukoscope.data.splits import stratified_val_split
from leukoscope.evaluate.calibration import fit_temperature
from leukoscope.evaluate.metrics import classification_metrics
from leukoscope.io import atomic_write_csv, atomic_write_json
from leukoscope.models.bundle import load_bundle, make_meta, read_meta, save_bundle
from leukoscope.models.inference import forward_logits
from leukoscope.models.heads import body_batchnorms, classifier_layer, grow_head, split_parameters
from leukoscope.models.ood import REFERENCE_KEY, fit_training_reference
from leukoscope.models.pipeline import normalize
from leukoscope.models.precision import autocast_context
from leukoscope.models.pretrained import weights_record
from leukoscope.models.registry import create_model, get_config
from leukoscope.progress import tqdm
from leukoscope.train import bf16 as precision
from leukoscope.train.augment import augment_batch
from leukoscope.train.balance import balanced_epoch, shard
from leukoscope.train.cache import build_cache
from leukoscope.train.checkpoint import (RESTART_HINT, RunMismatchError, check_resumable, check_same_data,
                                         load_checkpoint, run_lock, save_checkpoint)
from leukoscope.train.config import TrainConfig, config_diff
from leukoscope.train.distributed import any_rank, barrier, broadcast_buffers, init_distributed, pick_device
from leukoscope.train.loop import classes_of, resolve_training_scale, table_fingerprint
from leukoscope.train.threads import tuner_for


class TrainingDivergedError(RuntimeError):
    """The loss, the validation loss or a weight became NaN or infinite: the run stopped without a model."""


LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_balanced_acc", "lr", "images_per_s", "seconds"]


@dataclass
class TrainResult:
    out: Path
    bundle_path: Path
    meta: dict
    log: pd.DataFrame
    resumed_from: int = 0      # epochs already done when this call started
    reused: bool = False       # the run was already finished: nothing trained

    @property
    def metrics(self) -> dict:
        return self.meta.get("metrics", {})


def validation_metrics(logits, y, classes, temperature: float = 1.0) -> dict:
    """Loss (plain and at ``temperature``) plus :func:`~leukoscope.evaluate.metrics.classification_metrics`."""
    if len(y) == 0:
        return {}
    z, yt = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(y)
    m = classification_metrics(np.asarray(y), z.argmax(1).numpy(), labels=range(len(classes)))
    return {"n": m["n"], "loss": float(torch.nn.functional.cross_entropy(z, yt)),
            "loss_calibrated": float(torch.nn.functional.cross_entropy(z / temperature, yt)),
            **{k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}}


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine (to 1%) or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        p = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * p)) * 0.99 + 0.01

    return f


def initial_model(cfg: TrainConfig, classes, log: Callable[[str], None] = print) -> torch.nn.Module:
    """The network a run starts from: built from scratch, or ``cfg.init_from``'s weights with the head grown to ``classes``."""
    if not cfg.init_from:
        return create_model(cfg.model, num_classes=len(classes), input_size=cfg.input_size,
                            pretrained=bool(cfg.pretrained), **cfg.model_kwargs)
    meta = read_meta(cfg.init_from)
    if meta["model"] != cfg.model:
        raise ValueError(f"init_from {meta['_file']}: the bundle holds model {meta['model']!r}, the config says "
                         f"{cfg.model!r}; set the model to {meta['model']!r}")
    saw = {"input_size": meta.get("input_size"), "white_balance": bool(meta.get("white_balance", False))}
    differ = [f"{k} {saw[k]!r} -> {v!r}" for k, v in (("input_size", cfg.input_size),
                                                     ("white_balance", bool(cfg.white_balance))) if saw[k] != v]
    if differ:
        warnings.warn(f"init_from {meta['_file']}: the bundle saw its inputs otherwise ({'; '.join(differ)}); "
                      "its weights start from another input", RuntimeWarning, stacklevel=2)
    model = load_bundle(cfg.init_from).model.to(memory_format=torch.contiguous_format).train()
    old = list(meta["classes"])
    if old != list(classes):
        new = [c for c in classes if c not in old]
        log(f"init_from {meta['_file']}: classifier rearranged from {len(old)} to {len(classes)} classes"
            + (f" (new: {', '.join(new)})" if new else ""))
        grow_head(model, old, classes)
    else:
        log(f"init_from {meta['_file']}: starting from its weights")
    return model


class Trainer:
    """One training run of ``table`` into folder ``out``; :meth:`fit` runs it (see the module docstring).

    Arguments as :func:`train`'s. After :meth:`fit`, the run's pieces stay on the object
    (``model``, ``classes``, ``optimizer``, ``state``) for a notebook to look at.
    """

    def __init__(self, table: pd.DataFrame, out: str | os.PathLike, config: TrainConfig | None = None, *,
                 cache=None, progress: bool = True, log: Callable[[str], None] = print,
                 on_epoch_end: Callable[[int, dict], None] | None = None, resume: bool = True,
                 data_fingerprint: str | None = None, training_scale: dict | None = None,
                 classes=None, val_sources=None):
        self.cfg = (config or TrainConfig()).resolved()
        self.fixed_classes = None if classes is None else list(classes)
        self.val_sources = None if val_sources is None else {str(s) for s in val_sources}
        self.table, self.out = table, Path(out)
        self.cache, self.progress, self.log = cache, progress, log
        self.on_epoch_end, self.resume = on_epoch_end, resume
        self.data_fingerprint, self.training_scale = data_fingerprint, training_scale
        # what the run folder remembers it was trained on: the data as given (before unreadable images are left out)
        self.fingerprint = data_fingerprint or table_fingerprint(table)
        self.bundle_path = self.out / "model.safetensors"
        self.ckpt_path = self.out / "checkpoint.pt"
        self.dist = init_distributed()

    # ------------------------------------------------------------------ the recipe

    def fit(self) -> TrainResult:
        with run_lock(self.out):
            finished = self.finished_run() if self.resume else None
            if finished is not None:
                return finished
            self.checkpoint = self.read_checkpoint()
            self.prepare_data()
            self.build_model()
            self.resume_or_start()
            self.run_epochs()
            return self.finish()

    # ------------------------------------------------------------------ steps

    def finished_run(self) -> TrainResult | None:
        """The result of an earlier call whose bundle exists (same config, same data), else ``None``
        (also when a checkpoint lies beside the bundle: a restarted run, interrupted, resumes)."""
        if not self.bundle_path.exists() or self.ckpt_path.exists():
            return None
        meta = read_meta(self.bundle_path)
        meta.pop("_file", None)
        diff = config_diff(meta.get("config", {}), self.cfg.to_dict())
        if diff:
            raise RunMismatchError(f"{self.out} already holds a finished model trained with a different config "
                                   f"({'; '.join(diff[:4])}); {RESTART_HINT}")
        check_same_data(meta.get("fingerprint"), self.fingerprint, f"{self.out} already holds a finished model that")
        self.log(f"{self.out}: already finished; not retrained (--restart to train again)")
        log_csv = self.out / "log.csv"
        logdf = pd.read_csv(log_csv) if log_csv.exists() else pd.DataFrame(columns=LOG_COLUMNS)
        return TrainResult(self.out, self.bundle_path, meta, logdf, reused=True)

    def prepare_data(self) -> None:
        """Scale, decoded images, classes and the stratified validation split."""
        cfg, table = self.cfg, self.table.reset_index(drop=True)
        if len(table) == 0:
            raise ValueError("no training images")
        if cfg.balance_by == "source_class" and "source" not in table:
            raise ValueError("balance_by='source_class' needs a 'source' column in the training table")
        given = classes_of(list(table["label"]) + (self.fixed_classes or []))
        if len(given) < 2:
            raise ValueError(f"training needs at least 2 classes; the data hold {len(given)} "
                             f"({', '.join(given) or 'none'})")
        if self.training_scale is None:
            table, self.training_scale = resolve_training_scale(table, cfg.scale, log=self.log)
        has_scale = "um_per_px" in table and table["um_per_px"].notna().any()
        self.model_um = cfg.um_per_px if has_scale else None
        self.training_scale = {**self.training_scale, "model_um_per_px": self.model_um}
        cache = self.cache
        if cache is None or not cache.compatible(cfg.input_size, self.model_um, cfg.white_balance):
            t0 = time.time()
            cache = build_cache(table, cfg.input_size, self.model_um, workers=cfg.workers,
                                progress=self.progress and self.dist.is_main, white_balance=cfg.white_balance)
            self.log(f"decoded {len(cache)} images at {cfg.input_size}px in {time.time() - t0:.1f}s")
        bad = [p for p in table["path"] if str(p) not in cache]
        if bad:
            warnings.warn(f"{len(bad)} training images could not be read and are left out, e.g. {bad[0]}",
                          RuntimeWarning, stacklevel=4)
            table = table[table["path"].astype(str).isin(set(map(str, cache.paths)))].reset_index(drop=True)
        self.table, self.cache = table, cache
        self.classes = classes_of(list(table["label"]) + (self.fixed_classes or []))
        cidx = {c: i for i, c in enumerate(self.classes)}
        rows = cache.rows(table["path"])
        y_all = np.array([cidx[c] for c in table["label"]])
        if self.val_sources is None:
            pool = np.arange(len(table))
        else:
            if "source" not in table:
                raise ValueError("val_sources needs a 'source' column in the training table")
            pool = np.flatnonzero(table["source"].astype(str).isin(self.val_sources).to_numpy())
        _, va = stratified_val_split(y_all[pool], cfg.val_fraction, cfg.seed)
        self.va_idx = pool[va]
        self.tr_idx = np.setdiff1d(np.arange(len(table)), self.va_idx)
        self.x_tr, self.y_tr = cache.images[torch.as_tensor(rows[self.tr_idx])], y_all[self.tr_idx]
        self.x_va, self.y_va = cache.images[torch.as_tensor(rows[self.va_idx])], y_all[self.va_idx]
        self.src_tr = (table["source"].astype(str).to_numpy()[self.tr_idx]
                       if cfg.balance_by == "source_class" else None)
        self.counts = np.bincount(self.y_tr, minlength=len(self.classes))
        self.log(f"training {cfg.model} at {cfg.input_size}px on {len(self.tr_idx)} images ({len(self.classes)} "
                 f"classes, {self.counts.min()}-{self.counts.max()} per class), validating on {len(self.va_idx)}; "
                 f"{cfg.per_class}/class/epoch, up to {cfg.epochs} epochs")

    def build_model(self) -> None:
        """Device, precision, the network, optimizer (body and head groups), schedule, thread tuner."""
        cfg, dist = self.cfg, self.dist
        self.device = pick_device(dist, cfg.device)
        self.mcfg = get_config(cfg.model, input_size=cfg.input_size)
        self.on_cpu = torch.device(self.device).type == "cpu"
        self.use_bf16 = precision.flag(cfg.bf16, self.mcfg.cpu_bf16) if self.on_cpu else True  # AMP always on CUDA
        self.use_cl = precision.flag(cfg.channels_last, self.mcfg.channels_last)
        torch.manual_seed(cfg.seed)
        model = initial_model(cfg, self.classes, self.log).to(self.device)
        if self.use_cl:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.net = model, model
        if dist.enabled:
            self.net = DistributedDataParallel(model, device_ids=[dist.local_rank] if not self.on_cpu else None,
                                               find_unused_parameters=cfg.head_warmup_epochs > 0)
        body, head = split_parameters(model)
        self.body_params = body
        if cfg.body_lr_scale == 1.0:
            groups = [{"params": list(model.parameters())}]
        else:  # head first: the log's lr column is the head's (= --lr's schedule)
            groups = [{"params": head}, {"params": body, "lr": cfg.lr * cfg.body_lr_scale}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_drawn = len(np.unique(self.y_tr))  # classes an epoch draws (an adapted model may keep classes without images)
        steps_per_epoch = math.ceil(math.ceil(cfg.per_class * n_drawn / dist.world_size) / cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, steps_per_epoch))
        self.scaler = None
        if not self.on_cpu and not torch.cuda.is_bf16_supported():
            self.scaler = torch.amp.GradScaler("cuda")
        if self.on_cpu:
            torch.set_flush_denormal(True)
        self.tuner = tuner_for(self.device, cfg.threads, dist.enabled)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def read_checkpoint(self) -> dict | None:
        """The checkpoint of an interrupted run when resuming, checked for config and data (before any
        image is decoded); ``None`` when there is none or ``resume=False``."""
        if not (self.resume and self.ckpt_path.exists()):
            return None
        ck = load_checkpoint(self.ckpt_path)
        check_resumable(ck, self.cfg.to_dict(), ck.get("classes", []), self.ckpt_path, self.fingerprint)
        return ck

    def resume_or_start(self) -> None:
        """Load the checkpoint of an interrupted run (same config, classes and data), and write ``config.json``."""
        self.state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0, "log": [],
                      "best_model": None}
        self.resumed_from = 0
        ck = getattr(self, "checkpoint", None)
        if ck is not None:
            check_resumable(ck, self.cfg.to_dict(), self.classes, self.ckpt_path, self.fingerprint)
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.state = {k: ck[k] for k in self.state}
            self.resumed_from = int(ck["epoch"])
            self.log(f"resuming {self.out} after epoch {self.resumed_from}")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json({**self.cfg.to_dict(), "classes": list(self.classes),
                               "training_scale": self.training_scale}, self.out / "config.json")

    def validation_logits(self, bf16: bool | None = None):
        return forward_logits(self.model, self.x_va, self.mcfg.mean, self.mcfg.std,
                              batch_size=max(self.cfg.batch_size, 64), device=self.device,
                              bf16=self.use_bf16 if bf16 is None else bf16, channels_last=self.use_cl)

    def set_train_mode(self, epoch: int) -> bool:
        """Train mode for ``epoch`` (0-based); returns whether the body is frozen (head warm-up)."""
        head_only = epoch < self.cfg.head_warmup_epochs
        self.net.train()
        for p in self.body_params:
            p.requires_grad_(not head_only)
        if head_only:
            self.model.eval()
            classifier_layer(self.model).train()
        elif self.cfg.freeze_bn:
            for bn in body_batchnorms(self.model):
                bn.eval()
        return head_only

    def train_epoch(self, epoch: int) -> tuple[list[float], int, float]:
        """One balanced, augmented epoch: ``(losses, images seen, seconds in steps)``."""
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout etc.: a function of (seed, epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + dist.rank)
        order = shard(balanced_epoch(self.y_tr, cfg.per_class, cfg.seed, epoch, sources=self.src_tr),
                      dist.rank, dist.world_size)
        if self.set_train_mode(epoch):
            self.log(f"epoch {epoch + 1}: head warm-up (body frozen)")
        losses, seen, t_train = [], 0, 0.0
        bar = None
        if self.progress and dist.is_main:
            bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", leave=False)
        for i in range(0, len(order), cfg.batch_size):
            self.tuner.before_step()
            t_step = time.time()
            bi = order[i:i + cfg.batch_size]
            loss = self.step(self.x_tr[torch.as_tensor(bi)], self.y_tr[bi], gen)
            if any_rank(not math.isfinite(loss), dist, self.device):  # all ranks stop together
                if bar is not None:
                    bar.close()
                here = loss if not math.isfinite(loss) else "not finite on another rank"
                self.diverged(f"the training loss is {here} at epoch {epoch + 1}, step {i // cfg.batch_size + 1}")
            losses.append(loss)
            seen += len(bi)
            t_train += time.time() - t_step
            self.tuner.after_step(time.time() - t_step)
            if bar is not None:
                bar.update(len(bi))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", img_s=f"{seen / max(t_train, 1e-9):.0f}",
                                threads=self.tuner.choice)
        if bar is not None:
            bar.close()
        return losses, seen, t_train

    def step(self, x_uint8, y, gen: torch.Generator) -> float:
        """One optimisation step on a batch of decoded images; returns the loss."""
        xb = x_uint8.to(self.device, non_blocking=True)
        yb = torch.as_tensor(y, device=self.device)
        xb = normalize(augment_batch(xb, gen, self.cfg.augment), self.mcfg.mean, self.mcfg.std)
        if self.use_cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.use_bf16):
            loss = self.criterion(self.net(xb).float(), yb)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def diverged(self, what: str):
        """Stop the run: raise :class:`TrainingDivergedError` saying what became non-finite and what is kept."""
        kept = (f"; {self.ckpt_path} (after epoch {int(self.state['epoch'])}, all finite) is kept, but resuming "
                "from it with the same settings would diverge again" if self.ckpt_path.exists() and self.state["epoch"]
                else "")
        raise TrainingDivergedError(
            f"training diverged: {what} (peak learning rate {self.cfg.lr:g}); no model was written{kept}. "
            f"Lower --lr and train again with --restart")

    def check_finite_weights(self, epoch: int) -> None:
        """:meth:`diverged` when a weight or buffer of the model is NaN or infinite after ``epoch``."""
        for name, t in self.model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                self.diverged(f"weight {name} is not finite after epoch {epoch}")

    def end_epoch(self, epoch: int, losses, seen: int, t_train: float, t_epoch: float) -> dict:
        """Validate, update early stopping and the best weights, checkpoint, log; returns the log row.
        Non-finite weights or validation loss stop the run (:meth:`diverged`) before the checkpoint."""
        cfg, state, n_val = self.cfg, self.state, len(self.va_idx)
        broadcast_buffers(self.model, self.dist)  # every rank validates the same model
        self.check_finite_weights(epoch)
        m = validation_metrics(self.validation_logits(), self.y_va, self.classes) if n_val else {}
        if n_val and not math.isfinite(m["loss"]):
            self.diverged(f"the validation loss is {m['loss']} after epoch {epoch}")
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "val_loss": m.get("loss", float("nan")), "val_balanced_acc": m.get("balanced_accuracy", float("nan")),
               "lr": float(self.optimizer.param_groups[0]["lr"]),
               "images_per_s": seen * self.dist.world_size / max(t_train, 1e-9), "seconds": time.time() - t_epoch}
        state["log"].append(row)
        val_loss = m.get("loss", float("nan"))
        if not n_val or val_loss < state["best_val_loss"] - 1e-4:
            state["best_val_loss"] = val_loss if n_val else float("nan")
            state["best_epoch"] = epoch
            state["bad_epochs"] = 0
            state["best_model"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        self.log(f"epoch {epoch}/{cfg.epochs}: train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
                 f"val_bal_acc {row['val_balanced_acc']:.4f}  {row['images_per_s']:.0f} img/s  {row['seconds']:.0f}s"
                 + ("  (best)" if state["best_epoch"] == epoch else ""))
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "config": cfg.to_dict(), "classes": list(self.classes),
                "data_fingerprint": self.fingerprint, **state})
            atomic_write_csv(pd.DataFrame(state["log"], columns=LOG_COLUMNS), self.out / "log.csv")
        barrier(self.dist)
        return row

    def stopped_early(self) -> bool:
        return len(self.va_idx) > 0 and self.state["bad_epochs"] >= self.cfg.patience

    def run_epochs(self) -> None:
        """Epochs until ``epochs`` or early stopping."""
        epoch = int(self.state["epoch"])
        while epoch < self.cfg.epochs and not self.stopped_early():
            t_epoch = time.time()
            losses, seen, t_train = self.train_epoch(epoch)
            epoch += 1
            row = self.end_epoch(epoch, losses, seen, t_train, t_epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, row)
        for p in self.body_params:
            p.requires_grad_(True)
        if self.stopped_early():
            self.log(f"early stop: validation loss did not improve for {self.cfg.patience} epochs; "
                     f"best epoch {self.state['best_epoch']}")

    def finish(self) -> TrainResult:
        """Best weights, temperature, bf16 decision, bundle, OOD reference."""
        cfg, state, n_val = self.cfg, self.state, len(self.va_idx)
        model = self.model
        if state["best_model"] is not None:
            model.load_state_dict(state["best_model"])
        temperature, metrics, infer_bf16, bf16_info = 1.0, {}, False, {}
        if n_val:
            z_va = self.validation_logits()
            temperature = fit_temperature(z_va, self.y_va)
            metrics = {f"val_{k}": v for k, v in validation_metrics(z_va, self.y_va, self.classes, temperature).items()}
            if self.on_cpu and self.use_bf16:
                # bf16 inference for models where bf16 pays on this CPU (as in training: the registry's
                # cpu_bf16, or --bf16 on), and only where, with near-ties re-run in fp32, it gives fp32's calls
                infer_bf16, bf16_info = precision.inference_bf16(self.validation_logits(bf16=False),
                                                                 self.validation_logits(bf16=True))
        metrics.update({"best_epoch": int(state["best_epoch"]), "epochs_run": int(state["epoch"]),
                        "stopped_early": bool(self.stopped_early()),
                        "train_seconds": float(sum(r["seconds"] for r in state["log"])),
                        "n_train": int(len(self.tr_idx)), "n_val": int(n_val)})
        if cfg.init_from:
            started = read_meta(cfg.init_from).get("pretrained")
        else:
            started = weights_record(self.mcfg.pretrained) if cfg.pretrained else None
        meta = make_meta(
            classes=self.classes, model=cfg.model, input_size=cfg.input_size, mean=self.mcfg.mean, std=self.mcfg.std,
            um_per_px=self.model_um, temperature=temperature, config=cfg.to_dict(),
            fingerprint=self.fingerprint, metrics=metrics,
            channels_last=self.use_cl, inference_bf16=infer_bf16,
            train_counts={c: int(n) for c, n in zip(self.classes, self.counts)},
            training_scale=self.training_scale, white_balance=bool(cfg.white_balance), pretrained=started,
            **bf16_info,
        )
        if self.dist.is_main:
            save_bundle(model, meta, self.bundle_path)  # on disk first: a failing reference never costs the model
            if cfg.ood_reference:
                ref = fit_training_reference(model, meta, self.bundle_path, self.table.iloc[self.va_idx], self.device,
                                         self.log, cfg.seed)
                if ref is not None:
                    meta[REFERENCE_KEY] = ref
                    save_bundle(model, meta, self.bundle_path)
            atomic_write_json(meta, self.out / "metadata.json")
            if self.ckpt_path.exists():
                os.unlink(self.ckpt_path)
        barrier(self.dist)
        self.log(f"wrote {self.bundle_path}: val balanced accuracy "
                 f"{metrics.get('val_balanced_accuracy', float('nan')):.4f}, temperature {temperature:.3f}")
        return TrainResult(self.out, self.bundle_path, meta, pd.DataFrame(state["log"], columns=LOG_COLUMNS),
                           self.resumed_from)


def train(table: pd.DataFrame, out: str | os.PathLike, config: TrainConfig | None = None, *,
          cache=None, progress: bool = True, log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int, dict], None] | None = None, resume: bool = True,
          data_fingerprint: str | None = None, training_scale: dict | None = None) -> TrainResult:
    """Train one model on ``table`` (``path``, ``label`` [, ``um_per_px``, ``source``]) into folder ``out``.

    The validation split (for early stopping, temperature scaling and the OOD reference)
    is taken from ``table`` itself, stratified. The images' µm/px follows ``config.scale``
    (:func:`leukoscope.train.loop.resolve_training_scale`); a caller that resolved it already passes
    the table with ``um_per_px`` filled in and the record as ``training_scale`` (cross-validation
    does, once for all folds). Pass a prebuilt :class:`~leukoscope.train.cache.ImageCache`
    to share decoded images across runs (cross-validation does). ``on_epoch_end(epoch, row)``
    is called after each epoch's checkpoint is on disk. The one-call form of :class:`Trainer`.
    """
    return Trainer(table, out, config, cache=cache, progress=progress, log=log, on_epoch_end=on_epoch_end,
                   resume=resume, data_fingerprint=data_fingerprint, training_scale=training_scale).fit()
