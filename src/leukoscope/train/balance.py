"""Class balancing as in Matek et al. 2019: each epoch draws every class up to a target count.

A class with fewer images than the target is repeated (each image as evenly as
possible; augmentation makes the copies differ), a larger class is subsampled.
The epoch's order is a function of ``(seed, epoch)`` only, so a resumed run sees
the same batches, and every DDP rank computes the same list and takes its shard.

>>> import numpy as np
>>> idx = balanced_epoch(np.array([0, 0, 0, 1]), target_per_class=5, seed=0, epoch=0)
>>> np.bincount(np.array([0, 0, 0, 1])[idx]).tolist()
[5, 5]
"""

from __future__ import annotations

import numpy as np


def balanced_epoch(labels: np.ndarray, target_per_class: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Indices into ``labels`` for one epoch: ``target_per_class`` per present class, shuffled."""
    labels = np.asarray(labels)
    if target_per_class < 1:
        raise ValueError(f"target per class must be at least 1, got {target_per_class}")
    rng = np.random.default_rng([int(seed), int(epoch), 0xBA1A])
    parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        reps = -(-target_per_class // len(members))
        pool = np.concatenate([rng.permutation(members) for _ in range(reps)])
        parts.append(pool[:target_per_class])
    idx = np.concatenate(parts)
    return idx[rng.permutation(len(idx))]


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of an epoch (DistributedSampler-style: padded so all ranks get as many)."""
    if world_size <= 1:
        return indices
    n = -(-len(indices) // world_size) * world_size
    padded = np.concatenate([indices, indices[: n - len(indices)]])
    return padded[rank::world_size]
