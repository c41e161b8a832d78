"""Op-layer module of the C++/CUDA extension backends `cpp` and `cuda` (docs/BACKENDS.md).

The extension `fsq_kernels._C` (csrc/) defines the torch ops fsq::quantize,
fsq::quantize_backward, fsq::indices_to_codes, fsq::residual_quantize and
fsq::residual_quantize_backward on import (schemas: fsq_kernels/ops/registration.py), with CPU
kernels, and CUDA kernels when it was built with nvcc. This module registers their fake (meta)
implementations and autograd through the helper shared with the Triton backend, and passes each
op its table (fsq_kernels/ops/tables.py): the kernels derive no constant themselves.

Without the extension this module still imports; `is_available` is then False everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import registration, tables

from .. import _extension

# Importing _C registers torch.ops.fsq.*; None when not built (silent) or when it fails to load
# (_extension warns once with the error and how to rebuild).
_C, _ = _extension.load()

__all__ = ["indices_to_codes", "is_available", "quantize", "residual_quantize", "supports", "with_cuda"]
# (and quantize_train where the extension defines fsq::quantize_train)

MAX_CHANNELS = 16  # channels per codebook (csrc/fsq_math.h kMaxChannels)
MAX_LEVEL = 2**24  # every L
MAX_BOUNDARIES = 2**20  # boundaries of one level set: the table travels with every call


def with_cuda() -> bool:
    """The extension was compiled with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def is_available(device_type: str) -> bool:
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return with_cuda() and torch.cuda.is_available() and _extension.cuda_arch_supported()[0]
    return False


def supports(levels: tuple[int, ...]) -> bool:
    """The level sets the C++/CUDA kernels take: at most 16 channels per codebook, every
    L <= 2^24 and at most 2^20 boundaries in all (`auto` uses the reference beyond)."""
    return (len(levels) <= MAX_CHANNELS and max(levels) <= MAX_LEVEL
            and sum(levels) - len(levels) <= MAX_BOUNDARIES)


if _C is not None:
    registration.register_fakes("fsq")
    registration.register_autograd("fsq")


def quantize(
    z: Tensor,
    levels: tuple[int, ...],
    variant: str,
    hard_clamp: bool,
    channel_first: bool,
    num_codebooks: int,
    return_indices: bool,
) -> tuple[Tensor, Tensor | None]:
    """Codes (z's dtype, straight-through gradient) and indices (None unless requested)."""
    table = tables.quantize_table(levels, variant, hard_clamp, z.dtype)
    codes, indices = torch.ops.fsq.quantize(
        z, list(levels), variant, bool(hard_clamp), bool(channel_first), int(num_codebooks), bool(return_indices), table
    )
    return codes, (indices if return_indices else None)


def indices_to_codes(
    indices: Tensor,
    levels: tuple[int, ...],
    variant: str,
    channel_first: bool,
    num_codebooks: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Decode indices to codes (float32 unless dtype is given). CPU: ValueError for an index
    outside [0, prod(levels)); CUDA: no check (it would need a host sync), such a token decodes
    to NaN codes."""
    dtype = dtype or torch.float32
    table = tables.quantize_table(levels, variant, False, dtype)
    return torch.ops.fsq.indices_to_codes(indices, list(levels), variant, bool(channel_first), int(num_codebooks), dtype, table)


def residual_quantize(
    x: Tensor,
    levels: tuple[int, ...],
    num_stages: int,
    hard_clamp: bool,
    soft_clamp: tuple[float, ...] | None,
    channel_first: bool,
    active_stages: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Fused residual FSQ (reference.residual_quantize is the contract): (sum of the active
    stages' scaled codes in x.dtype, indices (..., num_stages) or (B, num_stages, ...), -1 for
    dropped stages and NaN tokens); differentiable with respect to x (only x is saved).
    active_stages: None (every stage) or a 0-d integer tensor on x's device."""
    table = tables.residual_table(levels, num_stages, hard_clamp, x.dtype)
    return torch.ops.fsq.residual_quantize(
        x, list(levels), int(num_stages), bool(hard_clamp),
        None if soft_clamp is None else [float(c) for c in soft_clamp],
        bool(channel_first), registration.active_stages_tensor(active_stages, int(num_stages), x.device), table,
    )


if _C is not None and hasattr(torch.ops.fsq, "quantize_train"):  # an extension built before it lacks the op

    def quantize_train(z: Tensor, levels: tuple[int, ...], variant: str, hard_clamp: bool, channel_first: bool,
                       num_codebooks: int, dither: str | None, dither_p: float, key_offset: Tensor | None,
                       return_usage: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """The training forward in one launch: (dithered codes, noiseless indices, histogram or None)."""
        return registration.quantize_train(torch.ops.fsq, z, levels, variant, hard_clamp, channel_first,
                                           num_codebooks, dither, dither_p, key_offset, return_usage)
