"""The run folder's state: checkpoints (written atomically every epoch, read without unpickling,
checked on resume), the run-folder lock, and what a run was trained on.

A run folder remembers its data (the fingerprint of the training table,
:func:`leukoscope.train.loop.table_fingerprint`, or the dataset's) and its config: a checkpoint
or finished model written for other data or another config is an error with the ``--restart``
hint, never silently resumed or returned.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path

import torch

from leukoscope.io import atomic_path, folder_lock
from leukoscope.train.config import config_diff
from leukoscope.train.distributed import dist_info

#: What every checkpoint holds besides the run's state.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "config", "classes", "epoch")
#: The command-line hint of a run folder that does not fit the command.
RESTART_HINT = "choose a new --out, or give --restart to train again over it"


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, not a checkpoint, or holding pickled objects)."""


class RunMismatchError(ValueError):
    """A run folder's checkpoint or model was written for other data or another config."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint (``torch.load(weights_only=True)``: never unpickles objects).

    A file that cannot be read so (truncated, another format, pickled objects) or lacks a
    checkpoint's keys raises :class:`CorruptCheckpointError` naming it, with the ``--restart`` hint."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpointError(f"corrupt checkpoint {path} ({reason}); --restart to start over") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CorruptCheckpointError(f"corrupt checkpoint {path} (not a training checkpoint: lacks "
                                     f"{', '.join(missing)}); --restart to start over")
    return ck


def check_resumable(checkpoint: dict, config: dict, classes, path, fingerprint: str | None = None) -> None:
    """Raise :class:`RunMismatchError` naming ``path`` when ``checkpoint`` was written with another config,
    class list or training data (``fingerprint``; a checkpoint without one is not checked for data)."""
    diff = config_diff(checkpoint.get("config", {}), config)
    if diff:
        raise RunMismatchError(f"{path} was written with a different config ({'; '.join(diff[:4])}); "
                               f"resume with the same settings, or {RESTART_HINT}")
    if list(checkpoint.get("classes", [])) != list(classes):
        raise RunMismatchError(f"{path} was trained on classes {checkpoint.get('classes')}, the data now has "
                               f"{list(classes)}; {RESTART_HINT}")
    check_same_data(checkpoint.get("data_fingerprint"), fingerprint, path)


def check_same_data(recorded: str | None, fingerprint: str | None, path, hint: str = RESTART_HINT) -> None:
    """Raise :class:`RunMismatchError` when ``path`` records training data (``recorded``) other than
    ``fingerprint`` (the message ends with ``hint``); nothing recorded: not checked."""
    if recorded and fingerprint and recorded != fingerprint:
        raise RunMismatchError(
            f"{path} was trained on other data (data fingerprint {recorded[:12]}..., the data now give "
            f"{fingerprint[:12]}...: other images, labels or files); {hint}")


def holds_run_lock(fn):
    """Decorator: ``fn`` runs holding :func:`run_lock` of its argument ``out``."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with run_lock(sig.bind(*args, **kwargs).arguments["out"]):
            return fn(*args, **kwargs)

    return locked


def run_lock(out: str | os.PathLike):
    """The exclusive lock of run folder ``out`` (:func:`leukoscope.io.folder_lock`) for the process that
    writes it: rank 0 of a distributed run holds it for all ranks (the others get a no-op)."""
    if not dist_info().is_main:
        return contextlib.nullcontext(Path(out))
    return folder_lock(out, "--out")
