"""The reference backend: fsq_kernels.reference behind the same interface as the fused backends,
so the op layer dispatches every backend the same way (docs/design.md, "Backends")."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dither as reference_dither
from .. import reference

__all__ = ["histogram", "indices_to_codes", "is_available", "quantize", "quantize_train", "residual_quantize",
           "supports"]


def is_available(device_type: str) -> bool:
    return True


def supports(levels: tuple[int, ...]) -> bool:
    """Any level set: the reference is the fallback for every other backend's limits."""
    return True


def quantize(z: Tensor, levels, variant, hard_clamp, channel_first, num_codebooks, return_indices):
    return reference.quantize(
        z, levels, variant=variant, hard_clamp=hard_clamp, channel_first=channel_first,
        num_codebooks=num_codebooks, return_indices=return_indices,
    )


def indices_to_codes(indices: Tensor, levels, variant, channel_first, num_codebooks, dtype):
    return reference.indices_to_codes(
        indices, levels, variant=variant, channel_first=channel_first, num_codebooks=num_codebooks, dtype=dtype
    )


def residual_quantize(x: Tensor, levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages):
    return reference.residual_quantize(
        x, levels, num_stages, hard_clamp=hard_clamp, soft_clamp=soft_clamp,
        channel_first=channel_first, active_stages=active_stages,
    )


def histogram(indices: Tensor, groups: int, size: int) -> Tensor:
    """(groups, size) int64 counts of `indices` (element e in codebook slot e % groups), one
    bincount; indices outside [0, size) (-1: NaN tokens, dropped stages) are skipped."""
    flat = indices.reshape(-1).to(torch.int64)
    slot = torch.arange(flat.numel(), device=flat.device) % groups
    valid = (flat >= 0) & (flat < size)
    bins = torch.where(valid, slot * size + flat, groups * size)  # invalid ones into a spare bin
    return torch.bincount(bins, minlength=groups * size + 1)[: groups * size].view(groups, size)


def quantize_train(z: Tensor, levels, variant, hard_clamp, channel_first, num_codebooks, dither, dither_p,
                   key_offset, return_usage):
    """The contract of the fused training forward: quantize, then fsq_kernels.dither.apply on the
    codes, then a bincount of the (noiseless) indices."""
    codes, indices = quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks, True)
    if dither is not None:
        codes = reference_dither.apply(codes, z, levels, dither, dither_p, key_offset, channel_first)
    usage = histogram(indices, num_codebooks, reference.codebook_size(levels)) if return_usage else None
    return codes, indices, usage
