"""Op-layer module of the C++/CUDA extension backends `cpp` and `cuda` (docs/BACKENDS.md).

The extension `fsq_kernels._C` (csrc/) defines the torch ops on import:

    fsq::quantize(Tensor z, int[] levels, str variant, bool hard_clamp, bool channel_first,
                  int num_codebooks, bool return_indices) -> (Tensor codes, Tensor indices)
    fsq::quantize_backward(Tensor grad_codes, Tensor z, ...) -> Tensor grad_z
    fsq::indices_to_codes(Tensor indices, int[] levels, str variant, bool channel_first,
                          int num_codebooks, ScalarType dtype) -> Tensor codes
    fsq::residual_quantize(Tensor x, int[] levels, int num_stages, bool hard_clamp,
                           float[]? soft_clamp, bool channel_first, int active_stages)
                           -> (Tensor out, Tensor indices)
    fsq::residual_quantize_backward(Tensor grad_out, Tensor x, ...same arguments) -> Tensor grad_x

with CPU kernels, and CUDA kernels when it was built with nvcc. This module registers their fake
(meta) implementations, so they trace under torch.compile(fullgraph=True), and the autograd
formulas of fsq::quantize (saves z only; the backward is one fsq::quantize_backward launch) and
fsq::residual_quantize (saves x only; the backward is one fsq::residual_quantize_backward launch,
which recomputes every stage from x).

Without the extension this module still imports; `is_available` is then False everywhere.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _extension

# Importing _C registers torch.ops.fsq.*; None when not built (silent) or when it fails to load
# (_extension warns once with the error and how to rebuild).
_C, _ = _extension.load()

__all__ = ["indices_to_codes", "is_available", "quantize", "residual_quantize", "with_cuda"]

_INT32_MAX = 2**31 - 1


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


def _index_dtype(levels: Sequence[int]) -> torch.dtype:
    size = 1
    for level in levels:
        size *= int(level)
    return torch.int32 if size <= _INT32_MAX else torch.int64


def _index_shape(shape: Sequence[int], channel_first: bool, num_codebooks: int) -> list:
    channel_dim = 1 if channel_first else len(shape) - 1
    out = [s for i, s in enumerate(shape) if i != channel_dim]
    if num_codebooks > 1:
        out.append(num_codebooks)
    return out


def _decode_shape(shape: Sequence[int], levels: Sequence[int], channel_first: bool, num_codebooks: int) -> list:
    tokens = list(shape[:-1]) if num_codebooks > 1 else list(shape)
    channels = len(levels) * num_codebooks
    if channel_first:
        return [tokens[0], channels, *tokens[1:]]
    return [*tokens, channels]


if _C is not None:

    @torch.library.register_fake("fsq::quantize")
    def _quantize_fake(z, levels, variant, hard_clamp, channel_first, num_codebooks, return_indices):
        codes = torch.empty_like(z)
        index_dtype = _index_dtype(levels)
        if return_indices:
            indices = z.new_empty(_index_shape(z.shape, channel_first, num_codebooks), dtype=index_dtype)
        else:
            indices = z.new_empty((0,), dtype=index_dtype)
        return codes, indices

    @torch.library.register_fake("fsq::quantize_backward")
    def _quantize_backward_fake(grad_codes, z, levels, variant, hard_clamp, channel_first, num_codebooks):
        return torch.empty_like(z)

    @torch.library.register_fake("fsq::indices_to_codes")
    def _indices_to_codes_fake(indices, levels, variant, channel_first, num_codebooks, dtype):
        return indices.new_empty(_decode_shape(indices.shape, levels, channel_first, num_codebooks), dtype=dtype)

    def _quantize_setup_context(ctx, inputs, output):
        z, levels, variant, hard_clamp, channel_first, num_codebooks, _ = inputs
        ctx.save_for_backward(z)
        ctx.set_materialize_grads(False)  # no zeros for the integer indices output
        ctx.args = (levels, variant, hard_clamp, channel_first, num_codebooks)

    def _quantize_backward(ctx, grad_codes, grad_indices):
        (z,) = ctx.saved_tensors
        grad_z = None
        if ctx.needs_input_grad[0] and grad_codes is not None:
            if grad_codes.dtype != z.dtype:
                grad_codes = grad_codes.to(z.dtype)
            grad_z = torch.ops.fsq.quantize_backward(grad_codes, z, *ctx.args)
        return grad_z, None, None, None, None, None, None

    torch.library.register_autograd(
        "fsq::quantize", _quantize_backward, setup_context=_quantize_setup_context
    )

    def _residual_index_shape(shape, channel_first, num_stages):
        out = list(shape)
        out[1 if channel_first else len(shape) - 1] = num_stages
        return out

    @torch.library.register_fake("fsq::residual_quantize")
    def _residual_quantize_fake(x, levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages):
        out = torch.empty_like(x)
        indices = x.new_empty(_residual_index_shape(x.shape, channel_first, num_stages), dtype=_index_dtype(levels))
        return out, indices

    @torch.library.register_fake("fsq::residual_quantize_backward")
    def _residual_quantize_backward_fake(grad_out, x, levels, num_stages, hard_clamp, soft_clamp, channel_first,
                                         active_stages):
        return torch.empty_like(x)

    def _residual_setup_context(ctx, inputs, output):
        x, levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages = inputs
        ctx.save_for_backward(x)  # only x, in its own dtype: the backward recomputes the stages
        ctx.set_materialize_grads(False)
        ctx.args = (levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages)

    def _residual_backward(ctx, grad_out, grad_indices):
        (x,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0] and grad_out is not None:
            if grad_out.dtype != x.dtype:
                grad_out = grad_out.to(x.dtype)
            grad_x = torch.ops.fsq.residual_quantize_backward(grad_out, x, *ctx.args)
        return grad_x, None, None, None, None, None, None

    torch.library.register_autograd(
        "fsq::residual_quantize", _residual_backward, setup_context=_residual_setup_context
    )


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
    codes, indices = torch.ops.fsq.quantize(
        z, list(levels), variant, bool(hard_clamp), bool(channel_first), int(num_codebooks), bool(return_indices)
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
    return torch.ops.fsq.indices_to_codes(
        indices, list(levels), variant, bool(channel_first), int(num_codebooks), dtype or torch.float32
    )


def residual_quantize(
    x: Tensor,
    levels: tuple[int, ...],
    num_stages: int,
    hard_clamp: bool,
    soft_clamp: tuple[float, ...] | None,
    channel_first: bool,
    active_stages: int,
) -> tuple[Tensor, Tensor]:
    """Fused residual FSQ (reference.residual_quantize is the contract): (sum of the active
    stages' scaled codes in x.dtype, indices (..., num_stages) or (B, num_stages, ...), -1 for
    dropped stages and NaN tokens); differentiable with respect to x (only x is saved)."""
    return torch.ops.fsq.residual_quantize(
        x, list(levels), int(num_stages), bool(hard_clamp),
        None if soft_clamp is None else [float(c) for c in soft_clamp],
        bool(channel_first), int(active_stages),
    )
