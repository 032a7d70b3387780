"""Batched augmentation as tensor ops (Matek et al. 2019: any rotation, flips).

Rotation by an angle drawn uniformly from [0, 360) is done for the whole batch
with ``affine_grid``/``grid_sample``; the corners a rotation uncovers are filled by
**reflection** of the image's own background, never with black. Horizontal and
vertical flips are folded into the same affine map. Optional brightness/contrast
jitter follows, then the colour measures of :func:`leukoscope.stain.colour_augment`:
HED stain jitter, saturation, gamma (tone curve) and blur (defocus), each only when
its amount is nonzero. Everything draws from one CPU ``torch.Generator`` (random
numbers are moved to the batch's device), so a seed gives the same batch. The settings are
:class:`~leukoscope.train.config.AugmentConfig`, the ``augment`` group of a training config.

>>> import torch
>>> x = torch.full((2, 32, 32, 3), 200, dtype=torch.uint8)
>>> y = augment_batch(x, torch.Generator().manual_seed(0))
>>> tuple(y.shape), float(y.min()) > 0.7
((2, 3, 32, 32), True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leukoscope.train.config import AugmentConfig

__all__ = ["AugmentConfig", "augment_batch", "random_affine", "rotate_flip", "to_float_nchw"]


def to_float_nchw(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or NCHW) -> float32 NCHW in [0, 1]."""
    if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def random_affine(n: int, generator: torch.Generator, rotate: bool = True, flip: bool = True) -> torch.Tensor:
    """``(n, 2, 3)`` affine maps: a rotation by U[0, 360) degrees composed with random h/v flips."""
    if rotate:
        ang = torch.rand(n, generator=generator) * (2 * math.pi)
    else:
        ang = torch.zeros(n)
    if flip:
        fx = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        fy = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    else:
        fx = fy = torch.ones(n)
    c, s = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c * fx, -s * fy
    theta[:, 1, 0], theta[:, 1, 1] = s * fx, c * fy
    return theta


def rotate_flip(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply affine maps ``theta`` to float NCHW ``x``; uncovered corners reflect the image."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_batch(x: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Augment a uint8 NHWC (or NCHW) batch; returns float NCHW in [0, 1] on ``x``'s device."""
    x = to_float_nchw(x)
    n = x.shape[0]
    if config.rotate or config.flip:
        x = rotate_flip(x, random_affine(n, generator, config.rotate, config.flip))
    if config.brightness > 0:
        b = 1 + (torch.rand(n, generator=generator) * 2 - 1) * config.brightness
        x = x * b.to(x.device).view(n, 1, 1, 1)
    if config.contrast > 0:
        c = 1 + (torch.rand(n, generator=generator) * 2 - 1) * config.contrast
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c.to(x.device).view(n, 1, 1, 1) + mean
    if config.brightness > 0 or config.contrast > 0:
        x = x.clamp_(0, 1)
    if any(v > 0 for v in config.colour.values()):
        from leukoscope.stain import colour_augment

        x = colour_augment(x, generator, **config.colour)
    return x
