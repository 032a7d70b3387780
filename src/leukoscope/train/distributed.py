"""Multi-GPU (or multi-process CPU) training via ``torchrun``: detected from RANK/WORLD_SIZE.

>>> info = dist_info({})
>>> (info.rank, info.world_size, info.is_main)
(0, 1, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info(env=None) -> DistInfo:
    env = os.environ if env is None else env
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init_distributed(info: DistInfo | None = None, backend: str | None = None) -> DistInfo:
    """Initialise the process group when ``WORLD_SIZE`` > 1 (nccl with CUDA, else gloo)."""
    info = info or dist_info()
    if info.enabled and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if dist.is_initialized():
            dist.barrier()


def any_rank(flag: bool, info: DistInfo, device="cpu") -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer; ``flag`` itself without DDP),
    so that all ranks stop together and none waits for a collective that will never come."""
    if not (info.enabled and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_buffers(model, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, but each rank's last batch
    then updates its own statistics; without this, the ranks would validate (best epoch, early
    stopping) on different models.
    """
    if info.enabled:
        if dist.is_initialized():
            for buf in model.buffers():
                dist.broadcast(buf.data, src=0)


def pick_device(info: DistInfo, device: str = "auto") -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return "cpu"
