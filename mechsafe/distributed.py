"""Data parallelism through ``torch.distributed``: which rank this process is, and sums across ranks.

A data-parallel run starts one process per device with ``torchrun``; each process calls :func:`init_from_env`
(``gloo`` on CPUs, ``nccl`` on GPUs), works on its own share of the batches (:func:`shard`) and adds its partial
results to the other ranks' with :func:`all_reduce_sum`. Without ``torchrun`` every function here is the trivial
single-process case, so library code calls them unconditionally.
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1); returns whether
    one is running. ``gloo`` serves CPU tensors, ``nccl`` CUDA ones."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return True


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: item ``j`` goes to rank ``j mod world_size``."""
    return list(items[rank()::world_size()])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (every rank gets the sum); a no-op in a single process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (every rank, before it exits: a rank that exits with the group still up can abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
