"""Data parallelism applied from outside the model (DESIGN.md principle 11).

`minicpm4 train ...` under `torchrun --nproc_per_node N` reads RANK / WORLD_SIZE / LOCAL_RANK, joins a
process group (gloo on CPU, nccl on GPU) and wraps the training module in DDP or FSDP2
(torch.distributed.fsdp.fully_shard: each decoder layer, then the root). Without those variables it is
a single process and nothing is wrapped.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the torchrun process group if the environment says so; pick the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world <= 1:
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world, local_rank, dev, backend)


def resolve_mode(mode: str, info: DistInfo) -> str:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel: unknown value {mode!r}; choose from {', '.join(PARALLEL_MODES)}")
    if not info.distributed:
        return "none"
    return "ddp" if mode in ("auto", "none") else mode


def wrap(module: nn.Module, mode: str, info: DistInfo, shard_units: list[nn.Module] | None = None) -> nn.Module:
    """DDP or FSDP2 around `module` (already on info.device). FSDP2 shards each of `shard_units`
    (the decoder layers) as its own unit, then the rest (embedding, norms, head) at the root."""
    mode = resolve_mode(mode, info)
    if mode == "none":
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units or []:
        fully_shard(unit)
    fully_shard(module)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The training module under a DDP wrapper (FSDP2 modifies the module in place, nothing to strip)."""
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
