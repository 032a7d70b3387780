"""The classifier head of a network: find it, grow it to new classes, tell it apart from the body.

The head is the network's last ``nn.Linear`` (every model of the registry ends in one);
everything else is the body. Fine-tuning (:class:`leukoscope.train.trainer.Trainer` with
``init_from``, ``head_warmup_epochs``, ``body_lr_scale``, ``freeze_bn``) uses these.

>>> from torch import nn
>>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> classifier_layer(m) is m[2]
True
>>> m = grow_head(m, ["LYT", "NGS"], ["LYT", "MON", "NGS"])
>>> classifier_layer(m).out_features
3
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: no classifier head to find")
    return found[-1]


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The classifier: the last ``nn.Linear`` of ``model`` in module order."""
    return _last_linear(model)[1]


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the classifier's weight and bias."""
    name = _last_linear(model)[0]
    return {f"{name}.{p}" if name else p for p, _ in classifier_layer(model).named_parameters()}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(body, head)`` parameters of ``model``."""
    head = head_parameter_names(model)
    body, hd = [], []
    for name, p in model.named_parameters():
        (hd if name in head else body).append(p)
    return body, hd


def body_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` (the head is a Linear, so all of them are the body's)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def grow_head(model: nn.Module, old_classes: Sequence[str], new_classes: Sequence[str]) -> nn.Module:
    """``model`` with its classifier rows rearranged from ``old_classes`` to ``new_classes`` (in place).

    A class in both keeps its row (weight and bias) exactly, so its logit is unchanged; a
    class only in ``new_classes`` gets a new row: weights drawn from a normal distribution
    with the old rows' standard deviation (torch's global generator), bias the mean of the old
    biases, so that it starts in the old classes' range. Classes only in ``old_classes`` are
    dropped. Returns ``model`` (the same object).
    """
    old_classes, new_classes = list(old_classes), list(new_classes)
    name, old = _last_linear(model)
    if not name:
        raise ValueError("the model is itself a Linear layer; wrap it to grow its head")
    if old.out_features != len(old_classes):
        raise ValueError(f"the classifier has {old.out_features} outputs but {len(old_classes)} old classes were given")
    new = nn.Linear(old.in_features, len(new_classes), bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        w_std = float(old.weight.std()) if old.weight.numel() > 1 else 0.01
        new.weight.normal_(0.0, w_std)
        if new.bias is not None:
            new.bias.fill_(float(old.bias.mean()))
        for j, c in enumerate(new_classes):
            if c in old_classes:
                i = old_classes.index(c)
                new.weight[j] = old.weight[i]
                if new.bias is not None:
                    new.bias[j] = old.bias[i]
    parent = model
    *path, last = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, new)
    return model
