"""The training loop: balanced augmented epochs, early stopping, checkpoints, resume, calibration.

>>> from leukoscope.data import read_dataset
>>> from leukoscope.train import TrainConfig, train, preset
>>> ds = read_dataset("../shared/data/pbc")                                  # doctest: +SKIP
>>> result = train(ds.table, "runs/pbc_fast", preset("fast", epochs=3))      # doctest: +SKIP
>>> result.bundle_path, result.metrics["val_balanced_accuracy"]              # doctest: +SKIP

Outputs in ``out``: ``model.safetensors`` (the bundle), ``metadata.json`` (a copy of
its metadata), ``config.json`` (effective config), ``log.csv`` (one row per epoch)
and, while training, ``checkpoint.pt`` (written atomically every epoch; a run that
finds it resumes from it; removed when the bundle is written). A run whose bundle
exists is not retrained.

Besides the weights, the bundle records the physical scale of the training images
(``meta["training_scale"]``: the table's µm/px, or with ``scale="estimate"`` the
red-cell estimate per source, :func:`resolve_training_scale`) and, unless
``ood_reference=False``, the out-of-distribution reference fitted on the run's own
validation images (``meta["reference"]``, :func:`leukoscope.models.ood.fit_reference`),
so that ``leukoscope evaluate`` warns about shifted sources without an extra step.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from leukoscope import taxonomy
from leukoscope.imaging.scale_policy import ScalePolicy
from leukoscope.io import atomic_path, atomic_write_csv, atomic_write_json
from leukoscope.models.ood import REFERENCE_KEY, fit_training_reference
from leukoscope.models.registry import get_config

LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_balanced_acc", "lr", "images_per_s", "seconds"]
#: Config fields that do not change what is learned (free to differ on resume).
_RUNTIME_FIELDS = {"workers", "progress", "device", "threads", "ood_reference"}
#: Values of ``TrainConfig.scale``: where the training images' µm/px comes from.
SCALE_MODES = ("stated", "estimate")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``)."""

    model: str = "mobilenet_v3_small"
    input_size: int | None = None       # None: the model's default
    um_per_px: float | None = None      # scale of the model input; None: the model's default
    epochs: int = 12
    per_class: int = 500                # images drawn per class per epoch (balancing target)
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    schedule: str = "cosine"            # cosine | constant
    label_smoothing: float = 0.0
    patience: int = 5                   # early stopping on validation loss
    val_fraction: float = 0.1
    seed: int = 0
    workers: int = 2                    # decode threads
    rotate: bool = True
    flip: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    stain_jitter: float = 0.0           # HED stain jitter sigma (= bias), leukoscope.train.augment.hed_jitter
    saturation: float = 0.0             # colour jitter after the stain jitter (leukoscope.train.augment.colour_augment):
    gamma: float = 0.0                  #   saturation factor in [1-s, 1+s], log gamma in [-g, g],
    blur: float = 0.0                   #   Gaussian blur sigma up to this many px; 0 = off
    white_balance: bool = False         # every input divided by its own background colour (train and inference)
    scale: str = "stated"               # training images' µm/px: stated (table, else resize) | estimate (red cells)
    ood_reference: bool = True          # fit the OOD reference on the validation images into the bundle
    bf16: str = "auto"                  # auto (the model's measured default) | on | off  (CPU only)
    channels_last: str = "auto"
    device: str = "auto"
    threads: str = "auto"               # CPU threads: auto (re-measured while training) | a number
    preset: str | None = None
    model_kwargs: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with model defaults filled in (input size, µm/px)."""
        mc = get_config(self.model, input_size=self.input_size)
        c = copy.deepcopy(self)
        c.input_size = mc.input_size
        if c.um_per_px is None:
            c.um_per_px = mc.um_per_px
        if c.scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {', '.join(SCALE_MODES)}, got {c.scale!r}")
        return c

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


# --------------------------------------------------------------------------- helpers


def classes_of(labels) -> tuple[str, ...]:
    present = set(labels)
    for c in present:
        taxonomy.check_class(c)
    return tuple(c for c in taxonomy.CLASSES if c in present)


def stratified_val_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): per class ``round(fraction * n)`` to validation, at least one image left to train.

    Classes with fewer than 3 images keep all of them for training.
    """
    rng = np.random.default_rng([int(seed), 0x7A1])
    tr, va = [], []
    for cls in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_val = 0 if n < 3 or fraction <= 0 else min(n - 1, max(1, int(round(fraction * n))))
        va.append(members[:n_val])
        tr.append(members[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def table_fingerprint(table: pd.DataFrame) -> str:
    """SHA-256 over sorted (path relative to the common folder, label, file size)."""
    from leukoscope.data import CellDataset

    paths = [str(p) for p in table["path"]]
    root = os.path.commonpath(paths) if paths else "."
    if len(paths) == 1:
        root = os.path.dirname(root)
    return CellDataset(table=table[["path", "label"]].reset_index(drop=True), layout="table", root=Path(root)).fingerprint()


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T)."""
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.01 < t < 100 else 1.0


def _metrics(logits, y, classes, temperature: float = 1.0) -> dict:
    import torch
    from sklearn.metrics import balanced_accuracy_score, f1_score

    if len(y) == 0:
        return {}
    z = torch.as_tensor(logits, dtype=torch.float64)
    yt = torch.as_tensor(y)
    pred = z.argmax(1).numpy()
    labels = list(range(len(classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "n": int(len(y)),
            "loss": float(torch.nn.functional.cross_entropy(z, yt)),
            "loss_calibrated": float(torch.nn.functional.cross_entropy(z / temperature, yt)),
            "accuracy": float((pred == np.asarray(y)).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        }


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
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


def _flag(value, default: bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).lower()
    if v == "auto":
        return default
    return v in ("on", "true", "1", "yes")


def _config_diff(a: dict, b: dict) -> list[str]:
    """Differences that matter between two configs; a field an older config lacks counts as its default."""
    defaults = TrainConfig().to_dict()
    a = {**{k: v for k, v in defaults.items() if k not in a}, **a}
    b = {**{k: v for k, v in defaults.items() if k not in b}, **b}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in _RUNTIME_FIELDS and a.get(k) != b.get(k)]


def resolve_training_scale(table: pd.DataFrame, scale: str = "stated", *,
                           log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """``(table, record)``: the training table with the µm/px of its images, and what the bundle records.

    ``scale="stated"``: the table's ``um_per_px`` where the reader gave one; other images
    are resized to the model input as they are (no physical scale).
    ``scale="estimate"``: where the table gives no µm/px, it is estimated from the red
    cells (the scale policy, :class:`leukoscope.imaging.scale_policy.ScalePolicy`), pooled over up to 40
    images per ``source`` (one pool when the table has no ``source`` column). An
    implausible estimate (too few red cells, outside 0.03-0.5 µm/px) is not used: those
    images are resized as with ``"stated"``, and a warning says so.

    ``record``: ``{"scale", "sources": {source: {"um_per_px", "origin", "n_images"}},
    "estimates": {source: ScaleEstimate as a dict}, "warnings"}``.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {', '.join(SCALE_MODES)}, got {scale!r}")
    table = table.reset_index(drop=True)
    um, _, rec = ScalePolicy(estimate="group" if scale == "estimate" else "off").resolve(table, reemit=True, log=log)
    if scale == "estimate":
        table = table.copy()
        table["um_per_px"] = um
    return table, {"scale": scale, "sources": rec.sources, "estimates": rec.estimates, "warnings": rec.warnings}


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint (``torch.load(weights_only=True)``: never unpickles objects)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


class ThreadTuner:
    """Pick the faster CPU thread count while training, re-measured every ``period`` steps.

    On a CPU shared with other jobs, torch's OpenMP threads waiting at barriers for a
    descheduled sibling can make a step 5-20x slower than with a single thread; on an idle
    CPU all threads are faster. So every ``period`` steps, ``probe`` steps run with each
    candidate count and the rest of the period uses the one with the shortest step.
    """

    def __init__(self, max_threads: int, period: int = 30, probe: int = 3, enabled: bool = True):
        import torch

        self.options = [max_threads, 1] if (enabled and max_threads > 1) else [max_threads]
        self.period, self.probe = period, probe
        self.choice = max_threads
        self.k = 0
        self._times: dict[int, list[float]] = {}
        self._current = max_threads
        torch.set_num_threads(max_threads)

    def before_step(self) -> None:
        import torch

        if len(self.options) == 1:
            return
        pos = self.k % self.period
        n_probe = self.probe * len(self.options)
        if pos == 0:
            self._times = {o: [] for o in self.options}
        if pos < n_probe:
            want = self.options[pos // self.probe]
        else:
            if pos == n_probe:
                self.choice = min(self._times, key=lambda o: min(self._times[o]) if self._times[o] else float("inf"))
            want = self.choice
        if want != self._current:
            torch.set_num_threads(want)
            self._current = want

    def after_step(self, seconds: float) -> None:
        pos = self.k % self.period
        if len(self.options) > 1 and pos < self.probe * len(self.options):
            self._times[self._current].append(seconds)
        self.k += 1


# --------------------------------------------------------------------------- train


def train(table: pd.DataFrame, out: str | os.PathLike, config: TrainConfig | None = None, *,
          cache=None, progress: bool = True, log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int, dict], None] | None = None, resume: bool = True,
          data_fingerprint: str | None = None, training_scale: dict | None = None) -> TrainResult:
    """Train one model on ``table`` (``path``, ``label`` [, ``um_per_px``, ``source``]) into folder ``out``.

    The validation split (for early stopping, temperature scaling and the OOD reference)
    is taken from ``table`` itself, stratified. The images' µm/px follows ``config.scale``
    (:func:`resolve_training_scale`); a caller that resolved it already passes the table
    with ``um_per_px`` filled in and the record as ``training_scale`` (cross-validation
    does, once for all folds). Pass a prebuilt :class:`~leukoscope.train.cache.ImageCache`
    to share decoded images across runs (cross-validation does). ``on_epoch_end(epoch, row)``
    is called after each epoch's checkpoint is on disk.
    """
    import torch

    from leukoscope.models.bundle import make_meta, read_meta, save_bundle
    from leukoscope.models.inference import forward_logits
    from leukoscope.models.precision import autocast_context
    from leukoscope.models.registry import create_model
    from leukoscope.train.augment import AugmentConfig, augment_batch
    from leukoscope.train.balance import balanced_epoch, shard
    from leukoscope.train.cache import build_cache
    from leukoscope.train.distributed import barrier, init_distributed, pick_device

    cfg = (config or TrainConfig()).resolved()
    out = Path(out)
    bundle_path = out / "model.safetensors"
    ckpt_path = out / "checkpoint.pt"
    dist = init_distributed()
    main = dist.is_main

    # ---- a finished run is not retrained
    if bundle_path.exists():
        meta = read_meta(bundle_path)
        meta.pop("_file", None)
        diff = _config_diff(meta.get("config", {}), cfg.to_dict())
        if diff:
            raise ValueError(f"{out} already holds a finished model trained with a different config "
                             f"({'; '.join(diff[:4])}); choose a new --out or delete {bundle_path}")
        log(f"{out}: already finished; not retrained (delete {bundle_path} to train again)")
        logdf = pd.read_csv(out / "log.csv") if (out / "log.csv").exists() else pd.DataFrame(columns=LOG_COLUMNS)
        return TrainResult(out, bundle_path, meta, logdf, reused=True)

    table = table.reset_index(drop=True)
    if len(table) == 0:
        raise ValueError("no training images")
    classes = classes_of(table["label"])
    cidx = {c: i for i, c in enumerate(classes)}
    if training_scale is None:
        table, training_scale = resolve_training_scale(table, cfg.scale, log=log)
    has_scale = "um_per_px" in table and table["um_per_px"].notna().any()
    model_um = cfg.um_per_px if has_scale else None
    training_scale = {**training_scale, "model_um_per_px": model_um}

    # ---- images, decoded once
    if cache is None or not cache.compatible(cfg.input_size, model_um, cfg.white_balance):
        t0 = time.time()
        cache = build_cache(table, cfg.input_size, model_um, workers=cfg.workers, progress=progress and main,
                            white_balance=cfg.white_balance)
        log(f"decoded {len(cache)} images at {cfg.input_size}px in {time.time() - t0:.1f}s")
    bad = [p for p in table["path"] if str(p) not in cache]
    if bad:
        warnings.warn(f"{len(bad)} training images could not be read and are left out, e.g. {bad[0]}",
                      RuntimeWarning, stacklevel=2)
        table = table[table["path"].astype(str).isin(set(map(str, cache.paths)))].reset_index(drop=True)
        classes = classes_of(table["label"])
        cidx = {c: i for i, c in enumerate(classes)}
    rows = cache.rows(table["path"])
    y_all = np.array([cidx[c] for c in table["label"]])
    tr_idx, va_idx = stratified_val_split(y_all, cfg.val_fraction, cfg.seed)
    x_tr, y_tr = cache.images[torch.as_tensor(rows[tr_idx])], y_all[tr_idx]
    x_va, y_va = cache.images[torch.as_tensor(rows[va_idx])], y_all[va_idx]
    counts = np.bincount(y_tr, minlength=len(classes))
    log(f"training {cfg.model} at {cfg.input_size}px on {len(tr_idx)} images ({len(classes)} classes, "
        f"{counts.min()}-{counts.max()} per class), validating on {len(va_idx)}; "
        f"{cfg.per_class}/class/epoch, up to {cfg.epochs} epochs")

    # ---- model and optimisation
    device = pick_device(dist, cfg.device)
    mcfg = get_config(cfg.model, input_size=cfg.input_size)
    on_cpu = torch.device(device).type == "cpu"
    use_bf16 = _flag(cfg.bf16, mcfg.cpu_bf16) if on_cpu else True  # AMP always on CUDA
    use_cl = _flag(cfg.channels_last, mcfg.channels_last)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(classes), input_size=cfg.input_size, **cfg.model_kwargs).to(device)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dist.local_rank] if not on_cpu else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_per_epoch = cfg.per_class * len(classes)
    steps_per_epoch = math.ceil(math.ceil(n_per_epoch / dist.world_size) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps_per_epoch))
    scaler = None
    if not on_cpu and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")
    if on_cpu:
        torch.set_flush_denormal(True)
        max_threads = int(cfg.threads) if str(cfg.threads).isdigit() else torch.get_num_threads()
        tuner = ThreadTuner(max_threads, enabled=str(cfg.threads) == "auto" and not dist.enabled)
    else:
        tuner = ThreadTuner(torch.get_num_threads(), enabled=False)
    aug = AugmentConfig(rotate=cfg.rotate, flip=cfg.flip, brightness=cfg.brightness, contrast=cfg.contrast,
                        stain_jitter=cfg.stain_jitter, saturation=cfg.saturation, gamma=cfg.gamma, blur=cfg.blur)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0, "log": [],
             "best_model": None}
    resumed_from = 0
    if ckpt_path.exists() and resume:
        ck = load_checkpoint(ckpt_path)
        diff = _config_diff(ck.get("config", {}), cfg.to_dict())
        if diff:
            raise ValueError(f"{ckpt_path} was written with a different config ({'; '.join(diff[:4])}); "
                             "resume with the same settings, or choose a new --out")
        if list(ck.get("classes", [])) != list(classes):
            raise ValueError(f"{ckpt_path} was trained on classes {ck.get('classes')}, the data now has {list(classes)}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = {k: ck[k] for k in state}
        resumed_from = int(ck["epoch"])
        log(f"resuming {out} after epoch {resumed_from}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json({**cfg.to_dict(), "classes": list(classes), "training_scale": training_scale},
                          out / "config.json")

    def evaluate_val(bf16: bool | None = None):
        z = forward_logits(model, x_va, mcfg.mean, mcfg.std, batch_size=max(cfg.batch_size, 64), device=device,
                           bf16=use_bf16 if bf16 is None else bf16, channels_last=use_cl)
        return z

    # ---- epochs
    epoch = int(state["epoch"])
    stopped_early = state["bad_epochs"] >= cfg.patience and len(va_idx) > 0
    while epoch < cfg.epochs and not stopped_early:
        t_epoch = time.time()
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout etc.: a function of (seed, epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + dist.rank)
        order = shard(balanced_epoch(y_tr, cfg.per_class, cfg.seed, epoch), dist.rank, dist.world_size)
        net.train()
        losses, seen, t_train = [], 0, 0.0
        batches = range(0, len(order), cfg.batch_size)
        bar = None
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", leave=False)
        for i in batches:
            tuner.before_step()
            t_step = time.time()
            bi = order[i:i + cfg.batch_size]
            xb = x_tr[torch.as_tensor(bi)].to(device, non_blocking=True)
            yb = torch.as_tensor(y_tr[bi], device=device)
            xb = augment_batch(xb, gen, aug)
            from leukoscope.models.pipeline import normalize

            xb = normalize(xb, mcfg.mean, mcfg.std)
            if use_cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, use_bf16):
                loss = crit(net(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            seen += len(bi)
            t_train += time.time() - t_step
            tuner.after_step(time.time() - t_step)
            if bar is not None:
                bar.update(len(bi))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", img_s=f"{seen / max(t_train, 1e-9):.0f}",
                                threads=tuner.choice)
        if bar is not None:
            bar.close()
        epoch += 1
        z_va = evaluate_val() if len(va_idx) else None
        m = _metrics(z_va, y_va, classes) if z_va is not None else {}
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "val_loss": m.get("loss", float("nan")), "val_balanced_acc": m.get("balanced_accuracy", float("nan")),
               "lr": float(opt.param_groups[0]["lr"]), "images_per_s": seen * dist.world_size / max(t_train, 1e-9),
               "seconds": time.time() - t_epoch}
        state["log"].append(row)
        val_loss = m.get("loss", float("nan"))
        if not len(va_idx) or val_loss < state["best_val_loss"] - 1e-4:
            state["best_val_loss"] = val_loss if len(va_idx) else float("nan")
            state["best_epoch"] = epoch
            state["bad_epochs"] = 0
            state["best_model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        stopped_early = len(va_idx) > 0 and state["bad_epochs"] >= cfg.patience
        log(f"epoch {epoch}/{cfg.epochs}: train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_bal_acc {row['val_balanced_acc']:.4f}  {row['images_per_s']:.0f} img/s  {row['seconds']:.0f}s"
            + ("  (best)" if state["best_epoch"] == epoch else ""))
        if main:
            _save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "config": cfg.to_dict(), "classes": list(classes), **state})
            atomic_write_csv(pd.DataFrame(state["log"], columns=LOG_COLUMNS), out / "log.csv")
        barrier(dist)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    if stopped_early:
        log(f"early stop: validation loss did not improve for {cfg.patience} epochs; best epoch {state['best_epoch']}")

    # ---- best model, calibration, bundle
    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    temperature, metrics, infer_bf16, bf16_info = 1.0, {}, False, {}
    if len(va_idx):
        z_va = evaluate_val()
        temperature = fit_temperature(z_va, y_va)
        metrics = {f"val_{k}": v for k, v in _metrics(z_va, y_va, classes, temperature).items()}
        if on_cpu and use_bf16:
            # bf16 inference for models where bf16 pays on this CPU (as in training: the registry's
            # cpu_bf16, or --bf16 on), and only where, with near-ties re-run in fp32, it gives fp32's calls
            from leukoscope.models.precision import bf16_check

            check = bf16_check(evaluate_val(bf16=False), evaluate_val(bf16=True))
            infer_bf16 = check["inference_bf16"] and check["max_abs_prob_diff"] < 0.02
            bf16_info = {"bf16_guard": check["bf16_guard"], "bf16_check": check}
    metrics.update({"best_epoch": int(state["best_epoch"]), "epochs_run": int(state["epoch"]),
                    "stopped_early": bool(stopped_early),
                    "train_seconds": float(sum(r["seconds"] for r in state["log"])),
                    "n_train": int(len(tr_idx)), "n_val": int(len(va_idx))})
    meta = make_meta(
        classes=classes, model=cfg.model, input_size=cfg.input_size, mean=mcfg.mean, std=mcfg.std,
        um_per_px=model_um, temperature=temperature, config=cfg.to_dict(),
        fingerprint=data_fingerprint or table_fingerprint(table), metrics=metrics,
        channels_last=use_cl, inference_bf16=infer_bf16, train_counts={c: int(n) for c, n in zip(classes, counts)},
        training_scale=training_scale, white_balance=bool(cfg.white_balance), **bf16_info,
    )
    if main:
        save_bundle(model, meta, bundle_path)  # on disk first: a failing reference never costs the model
        if cfg.ood_reference:
            ref = fit_training_reference(model, meta, bundle_path, table.iloc[va_idx], device, log, cfg.seed)
            if ref is not None:
                meta[REFERENCE_KEY] = ref
                save_bundle(model, meta, bundle_path)
        atomic_write_json(meta, out / "metadata.json")
        if ckpt_path.exists():
            os.unlink(ckpt_path)
    barrier(dist)
    log(f"wrote {bundle_path}: val balanced accuracy {metrics.get('val_balanced_accuracy', float('nan')):.4f}, "
        f"temperature {temperature:.3f}")
    return TrainResult(out, bundle_path, meta, pd.DataFrame(state["log"], columns=LOG_COLUMNS), resumed_from)
