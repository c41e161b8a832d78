"""Fake implementations and autograd of the fused ops, written once for both op namespaces:
``fsq::`` (the C++/CUDA extension, fsq_kernels/ops/native.py) and ``fsq_triton::``
(fsq_kernels/ops/triton.py). Both namespaces have the same schemas:

    quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks, return_indices, table)
        -> (codes, indices)          indices: an empty int tensor when not requested
    quantize_backward(grad_codes, z, levels, variant, hard_clamp, channel_first, num_codebooks,
                      table) -> grad_z
    indices_to_codes(indices, levels, variant, channel_first, num_codebooks, dtype, table) -> codes
    residual_quantize(x, levels, num_stages, hard_clamp, soft_clamp, channel_first,
                      active_stages, table) -> (out, indices)
    residual_quantize_backward(grad_out, x, ...the same arguments) -> grad_x

`table` is the level-set table of fsq_kernels/ops/tables.py; `active_stages` None or a 0-d
integer tensor on x's device. Autograd saves only the input (and active_stages); each backward
is one launch of the matching *_backward op (straight-through across the round, the true
derivative of the bound; residual: every stage recomputed from x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import shapes

__all__ = ["active_stages_tensor", "register_autograd", "register_fakes"]


def register_fakes(namespace: str) -> None:
    """Fake (meta) implementations, for ops whose kernels are not traceable Python (C++)."""

    @torch.library.register_fake(f"{namespace}::quantize")
    def _quantize_fake(z, levels, variant, hard_clamp, channel_first, num_codebooks, return_indices, table):
        shape = shapes.index_shape(z.shape, channel_first, num_codebooks) if return_indices else (0,)
        return torch.empty_like(z), z.new_empty(shape, dtype=shapes.index_dtype(levels))

    @torch.library.register_fake(f"{namespace}::quantize_backward")
    def _quantize_backward_fake(grad_codes, z, levels, variant, hard_clamp, channel_first, num_codebooks, table):
        return torch.empty_like(z)

    @torch.library.register_fake(f"{namespace}::indices_to_codes")
    def _indices_to_codes_fake(indices, levels, variant, channel_first, num_codebooks, dtype, table):
        return indices.new_empty(shapes.decode_shape(indices.shape, levels, channel_first, num_codebooks), dtype=dtype)

    @torch.library.register_fake(f"{namespace}::residual_quantize")
    def _residual_quantize_fake(x, levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages, table):
        indices = x.new_empty(shapes.residual_index_shape(x.shape, channel_first, num_stages),
                              dtype=shapes.index_dtype(levels))
        return torch.empty_like(x), indices

    @torch.library.register_fake(f"{namespace}::residual_quantize_backward")
    def _residual_quantize_backward_fake(grad_out, x, levels, num_stages, hard_clamp, soft_clamp, channel_first,
                                         active_stages, table):
        return torch.empty_like(x)


def register_autograd(namespace: str) -> None:
    """Autograd of <namespace>::quantize and <namespace>::residual_quantize."""
    ops = getattr(torch.ops, namespace)

    def _quantize_setup(ctx, inputs, output):
        z, levels, variant, hard_clamp, channel_first, num_codebooks, _, table = inputs
        ctx.save_for_backward(z)  # only z, in its own dtype
        ctx.set_materialize_grads(False)  # no zeros for the integer indices output
        ctx.args = (levels, variant, hard_clamp, channel_first, num_codebooks, table)

    def _quantize_backward(ctx, grad_codes, grad_indices):
        (z,) = ctx.saved_tensors
        grad_z = None
        if ctx.needs_input_grad[0] and grad_codes is not None:
            grad_z = ops.quantize_backward(grad_codes.to(z.dtype), z, *ctx.args)
        return grad_z, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::quantize", _quantize_backward, setup_context=_quantize_setup)

    def _residual_setup(ctx, inputs, output):
        x, levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages, table = inputs
        ctx.save_for_backward(x, active_stages)  # only x: the backward recomputes the stages
        ctx.set_materialize_grads(False)
        ctx.args = (levels, num_stages, hard_clamp, soft_clamp, channel_first)
        ctx.table = table

    def _residual_backward(ctx, grad_out, grad_indices):
        x, active_stages = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0] and grad_out is not None:
            grad_x = ops.residual_quantize_backward(grad_out.to(x.dtype), x, *ctx.args, active_stages, ctx.table)
        return grad_x, None, None, None, None, None, None, None

    torch.library.register_autograd(
        f"{namespace}::residual_quantize", _residual_backward, setup_context=_residual_setup
    )


def active_stages_tensor(active_stages, num_stages: int, device) -> Tensor | None:
    """None or a 0-d integer tensor, as the residual ops take it; an int (callers from before
    active_stages became a tensor) becomes None (every stage) or a tensor."""
    if active_stages is None or isinstance(active_stages, Tensor):
        return active_stages
    if int(active_stages) == num_stages:
        return None
    return torch.tensor(int(active_stages), dtype=torch.int64, device=device)
