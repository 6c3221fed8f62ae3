"""Data-parallel training across processes with torch.distributed (launched by torchrun).

``torchrun --nproc_per_node=N -m bpl compress ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`init` turns them into a process group (NCCL on CUDA, gloo on
the CPU) and a :class:`Context` that the engine and pipeline consult: rank 0 alone
writes files and shows progress, every rank trains on its shard of each global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import BPLError
from .modules import unwrap_parallel

__all__ = [
    "Context",
    "all_reduce_sum",
    "barrier",
    "current",
    "init",
    "main_first",
    "shutdown",
    "unwrap",
    "wrap",
]


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT = Context()


def current() -> Context:
    """The context set by :func:`init` (a single-process one before that)."""
    return _CURRENT


def init(device: str = "auto") -> Context:
    """Join the process group torchrun describes in the environment; no-op when run alone."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CURRENT = Context()
        return _CURRENT
    if not dist.is_available():
        raise BPLError("this torch build has no torch.distributed; run without torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    _CURRENT = Context(rank=rank, world_size=world, local_rank=local)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Context()


def barrier() -> None:
    if _CURRENT.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing caches, split files), then the others."""
    if not _CURRENT.is_main:
        barrier()
    yield
    if _CURRENT.is_main:
        barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place); identity when run alone."""
    if _CURRENT.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel (after extend: partners included); as-is alone."""
    if not _CURRENT.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, with plain BatchNorm2d again."""
    model = unwrap_parallel(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=module.running_mean.device)
            bn.load_state_dict(module.state_dict())
            model.set_submodule(name, bn)
    return model
