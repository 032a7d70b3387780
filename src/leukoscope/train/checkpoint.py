"""Training checkpoints: written atomically every epoch, read without unpickling, checked on resume."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from leukoscope.io import atomic_path
from leukoscope.train.config import config_diff


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint (``torch.load(weights_only=True)``: never unpickles objects)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(checkpoint: dict, config: dict, classes, path) -> None:
    """Raise ``ValueError`` naming ``path`` when ``checkpoint`` was written with another config or class list."""
    diff = config_diff(checkpoint.get("config", {}), config)
    if diff:
        raise ValueError(f"{path} was written with a different config ({'; '.join(diff[:4])}); "
                         "resume with the same settings, or choose a new --out")
    if list(checkpoint.get("classes", [])) != list(classes):
        raise ValueError(f"{path} was trained on classes {checkpoint.get('classes')}, the data now has {list(classes)}")
