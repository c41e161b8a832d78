"""Fake implementations and autograd of the fused ops, written once for both op namespaces:
``fsq::`` (the C++/CUDA extension, fsq_kernels/ops/native.py) and ``fsq_triton::``
(fsq_kernels/ops/triton.py). Both namespaces have the same schemas:

    quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks, return_indices, table)
        -> (codes, indices)          indices: an empty int tensor when not requested
    quantize_backward(grad_codes, z, levels, variant, hard_clamp, channel_first, num_codebooks,
                      table, key_offset=None, dither_mode=0, dither_p=0.0, dither_steps=[]) -> grad_z
    quantize_train(z, levels, variant, hard_clamp, channel_first, num_codebooks, table, key_offset,
                   dither_mode, dither_p, dither_steps, return_usage) -> (codes, indices, usage)
    indices_to_codes(indices, levels, variant, channel_first, num_codebooks, dtype, table) -> codes
    residual_quantize(x, levels, num_stages, hard_clamp, soft_clamp, channel_first,
                      active_stages, table) -> (out, indices)
    residual_quantize_backward(grad_out, x, ...the same arguments) -> grad_x

`table` is the level-set table of fsq_kernels/ops/tables.py; `active_stages` None or a 0-d
integer tensor on x's device. Autograd saves only the input (and active_stages, key_offset); each
backward is one launch of the matching *_backward op (straight-through across the round, the true
derivative of the bound; residual: every stage recomputed from x).

quantize_train is the training forward in one launch (docs/dither.md): dither_mode 0 none, 1
"peer", 2 "taae"; key_offset the int64 [key, offset] tensor on z's device (None without dither);
dither_steps fsq_kernels.dither.steps(levels); codes dithered, indices the noiseless ones, usage
the (num_codebooks, prod(levels)) int64 histogram of the indices, or an empty (0,) int64 tensor
when return_usage is False. Its backward is quantize_backward with the same dither arguments,
which regenerates the noise from the counters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dither as reference_dither
from .. import reference, shapes
from . import tables

__all__ = ["QUANTIZE_BACKWARD_SCHEMA", "QUANTIZE_TRAIN_SCHEMA", "active_stages_tensor", "quantize_train",
           "register_autograd", "register_fakes"]

# The two schemas the Triton ops spell out (triton_op cannot infer a list default); the C++ ops
# (csrc/fsq_ops.cpp) declare the same.
QUANTIZE_BACKWARD_SCHEMA = (
    "(Tensor grad_codes, Tensor z, int[] levels, str variant, bool hard_clamp, bool channel_first, "
    "int num_codebooks, float[] table, Tensor? key_offset=None, int dither_mode=0, float dither_p=0.0, "
    "float[] dither_steps=[]) -> Tensor"
)
QUANTIZE_TRAIN_SCHEMA = (
    "(Tensor z, int[] levels, str variant, bool hard_clamp, bool channel_first, int num_codebooks, "
    "float[] table, Tensor? key_offset, int dither_mode, float dither_p, float[] dither_steps, "
    "bool return_usage) -> (Tensor codes, Tensor indices, Tensor usage)"
)


def register_fakes(namespace: str) -> None:
    """Fake (meta) implementations, for ops whose kernels are not traceable Python (C++)."""

    @torch.library.register_fake(f"{namespace}::quantize")
    def _quantize_fake(z, levels, variant, hard_clamp, channel_first, num_codebooks, return_indices, table):
        shape = shapes.index_shape(z.shape, channel_first, num_codebooks) if return_indices else (0,)
        return torch.empty_like(z), z.new_empty(shape, dtype=shapes.index_dtype(levels))

    @torch.library.register_fake(f"{namespace}::quantize_backward")
    def _quantize_backward_fake(grad_codes, z, levels, variant, hard_clamp, channel_first, num_codebooks, table,
                                key_offset=None, dither_mode=0, dither_p=0.0, dither_steps=()):
        return torch.empty_like(z)

    if hasattr(getattr(torch.ops, namespace), "quantize_train"):  # the C++ op may come later than the others

        @torch.library.register_fake(f"{namespace}::quantize_train")
        def _quantize_train_fake(z, levels, variant, hard_clamp, channel_first, num_codebooks, table, key_offset,
                                 dither_mode, dither_p, dither_steps, return_usage):
            indices = z.new_empty(shapes.index_shape(z.shape, channel_first, num_codebooks),
                                  dtype=shapes.index_dtype(levels))
            usage = (num_codebooks, reference.codebook_size(levels)) if return_usage else (0,)
            return torch.empty_like(z), indices, z.new_empty(usage, dtype=torch.int64)

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


def _register_straight_through(ops, name: str, num_inputs: int, split) -> None:
    """Autograd of <ns>::<name> (quantize or quantize_train): one quantize_backward launch from z
    (and the dither's key_offset: 16 bytes). split(inputs) -> (z, quantize_backward's arguments
    after z up to the table, key_offset, the dither arguments or ())."""
    def setup(ctx, inputs, output):
        z, args, key_offset, dither = split(inputs)
        ctx.save_for_backward(z, key_offset)  # z in its own dtype; nothing per element besides it
        ctx.set_materialize_grads(False)  # no zeros for the integer outputs
        ctx.args, ctx.dither = args, dither

    def backward(ctx, grad_codes, *grad_integer_outputs):
        z, key_offset = ctx.saved_tensors
        grad_z = None
        if ctx.needs_input_grad[0] and grad_codes is not None:
            extra = (key_offset, *ctx.dither) if ctx.dither and ctx.dither[0] else ()  # dither_mode 0: none
            grad_z = ops.quantize_backward(grad_codes.to(z.dtype), z, *ctx.args, *extra)
        return (grad_z,) + (None,) * (num_inputs - 1)

    torch.library.register_autograd(f"{ops.name}::{name}", backward, setup_context=setup)


def register_autograd(namespace: str) -> None:
    """Autograd of <namespace>::quantize, ::quantize_train (where it exists) and ::residual_quantize."""
    ops = getattr(torch.ops, namespace)
    _register_straight_through(ops, "quantize", 8, lambda i: (i[0], (*i[1:6], i[7]), None, ()))
    if hasattr(ops, "quantize_train"):
        _register_straight_through(ops, "quantize_train", 12, lambda i: (i[0], tuple(i[1:7]), i[7], tuple(i[8:11])))

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


def quantize_train(ops, z: Tensor, levels, variant, hard_clamp, channel_first, num_codebooks, dither, dither_p,
                   key_offset, return_usage):
    """<ops>.quantize_train (ops: torch.ops.fsq or torch.ops.fsq_triton) with its table, steps and
    mode id: (codes, indices, usage or None). dither: None, "peer" or "taae"; arguments valid."""
    table = tables.quantize_table(levels, variant, hard_clamp, z.dtype)
    steps = list(reference_dither.steps(levels)) if dither is not None else []
    codes, indices, usage = ops.quantize_train(
        z, list(levels), variant, bool(hard_clamp), bool(channel_first), int(num_codebooks), table, key_offset,
        reference_dither.mode_id(dither), float(dither_p), steps, bool(return_usage),
    )
    return codes, indices, (usage if return_usage else None)
