"""The distributed environment: rank / world / device from torchrun's variables, the process
group (nccl on GPUs, gloo on CPU), and the few collectives the training package needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Ctx", "setup_distributed", "cleanup_distributed", "barrier", "gather_objects", "ddp_wrap"]


@dataclass
class Ctx:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Ctx:
    """The process's Ctx; `device` "cpu" keeps a run (and its DDP, over gloo) on the CPU even where
    a GPU is visible; None picks CUDA when available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Ctx(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Ctx) -> None:
    if ctx.world > 1:
        dist.barrier()


def gather_objects(obj, ctx: Ctx) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def ddp_wrap(model: nn.Module, ctx: Ctx) -> nn.Module:
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
