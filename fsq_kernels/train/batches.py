"""Which examples each rank trains on at each step, and the data of a run.

Batches are global: at step s the run takes a seeded permutation of the epoch's indices, the
global batch [i * B, (i + 1) * B) of it, and rank r takes its slice of B / W. A pure function of
(seed, step, B): a resumed run sees exactly the batches it would have seen, on any world size W
that divides B.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import make_datasets
from .distributed import Ctx

__all__ = ["per_rank_batch", "batch_indices", "StepBatchSampler", "batch_stream", "load_data", "to_model_layout"]


def per_rank_batch(global_batch: int, world: int) -> int:
    if global_batch % world != 0:
        raise ValueError(f"the global batch {global_batch} must divide by the world size {world}")
    return global_batch // world


def batch_indices(n: int, global_batch: int, seed: int, step: int, rank: int, world: int) -> Tensor:
    """The dataset indices rank `rank` of `world` trains on at `step` (global batch `global_batch`)."""
    local = per_rank_batch(global_batch, world)
    if global_batch > n:
        raise ValueError(f"the global batch {global_batch} exceeds the dataset size {n}")
    per_epoch = n // global_batch
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = i * global_batch + rank * local
    return perm[start:start + local]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields batch_indices(...) for steps start, start+1, ..., total-1 (for DataLoader workers)."""

    def __init__(self, n: int, global_batch: int, seed: int, start: int, total: int, rank: int, world: int):
        self.args = (n, global_batch, seed, rank, world)
        self.start, self.total = start, total

    def __iter__(self):
        n, batch, seed, rank, world = self.args
        for step in range(self.start, self.total):
            yield batch_indices(n, batch, seed, step, rank, world).tolist()

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def batch_stream(ds, global_batch: int, seed: int, start: int, total: int, ctx: Ctx, num_workers: int):
    """(images in [0, 1], labels) for each step from `start`: indexed directly for in-memory data,
    through a DataLoader with workers for image folders. Either way a step's batch depends only on
    (seed, step), so resumed runs see the same data."""
    if hasattr(ds, "images"):
        for step in range(start, total):
            yield ds.batch(batch_indices(len(ds), global_batch, seed, step, ctx.rank, ctx.world))
        return
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=StepBatchSampler(len(ds), global_batch, seed, start, total, ctx.rank, ctx.world),
        num_workers=num_workers, pin_memory=ctx.device.type == "cuda", persistent_workers=False)
    yield from loader


def load_data(cfg, seed: int):
    """(train, val) datasets of a Config; image folders are checked for unreadable files first."""
    return make_datasets(cfg.data, cfg.num_train, cfg.num_val, cfg.image_size, seed, tuple(cfg.shape_size),
                         cfg.shape_jitter, skip_bad_images=cfg.skip_bad_images)


def to_model_layout(x: Tensor, channels_last: bool) -> Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
