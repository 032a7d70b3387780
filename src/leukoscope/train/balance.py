"""Class balancing as in Matek et al. 2019: each epoch draws every class up to a target count.

A class with fewer images than the target is repeated (each image as evenly as
possible; augmentation makes the copies differ), a larger class is subsampled.
With ``sources`` (``balance_by="source_class"``, a table pooled from several labs), each
class's draw is spread evenly over the sources that have it, so that no lab's images of
a class crowd out another's. The epoch's order is a function of ``(seed, epoch)`` only, so a resumed run sees
the same batches, and every DDP rank computes the same list and takes its shard.

>>> import numpy as np
>>> idx = balanced_epoch(np.array([0, 0, 0, 1]), target_per_class=5, seed=0, epoch=0)
>>> np.bincount(np.array([0, 0, 0, 1])[idx]).tolist()
[5, 5]
>>> src = np.array(["a", "a", "a", "b", "b", "b"])
>>> idx = balanced_epoch(np.array([0, 0, 0, 0, 1, 1]), 6, sources=src)
>>> sorted(zip(src[idx].tolist(), np.array([0, 0, 0, 0, 1, 1])[idx].tolist())).count(("a", 0))
3
"""

from __future__ import annotations

import numpy as np


def _draw(members: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``members``: each as evenly often as possible, in random order."""
    reps = -(-n // len(members))
    return np.concatenate([rng.permutation(members) for _ in range(reps)])[:n]


def balanced_epoch(labels: np.ndarray, target_per_class: int, seed: int = 0, epoch: int = 0,
                   sources: np.ndarray | None = None) -> np.ndarray:
    """Indices into ``labels`` for one epoch: ``target_per_class`` per present class, shuffled.

    With ``sources`` (one per label), a class's ``target_per_class`` images are split as evenly
    as possible over the sources that have the class (the remainder to a random few of them).
    """
    labels = np.asarray(labels)
    if target_per_class < 1:
        raise ValueError(f"target per class must be at least 1, got {target_per_class}")
    if sources is not None:
        return _balanced_by_source(labels, np.asarray(sources).astype(str), target_per_class, seed, epoch)
    rng = np.random.default_rng([int(seed), int(epoch), 0xBA1A])
    idx = np.concatenate([_draw(np.flatnonzero(labels == cls), target_per_class, rng) for cls in np.unique(labels)])
    return idx[rng.permutation(len(idx))]


def _balanced_by_source(labels: np.ndarray, sources: np.ndarray, target: int, seed: int, epoch: int) -> np.ndarray:
    if len(sources) != len(labels):
        raise ValueError(f"{len(sources)} sources for {len(labels)} labels")
    rng = np.random.default_rng([int(seed), int(epoch), 0xBA1A, 0x5C])
    parts = []
    for cls in np.unique(labels):
        in_cls = labels == cls
        srcs = np.unique(sources[in_cls])
        share = np.full(len(srcs), target // len(srcs))
        share[rng.permutation(len(srcs))[: target % len(srcs)]] += 1
        for s, n in zip(srcs, share):
            if n:
                parts.append(_draw(np.flatnonzero(in_cls & (sources == s)), int(n), rng))
    idx = np.concatenate(parts)
    return idx[rng.permutation(len(idx))]


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of an epoch (DistributedSampler-style: padded so all ranks get as many)."""
    if world_size <= 1:
        return indices
    n = -(-len(indices) // world_size) * world_size
    padded = np.concatenate([indices, indices[: n - len(indices)]])
    return padded[rank::world_size]
