"""The fused dither's op layer: registration, autograd and dispatch of `fsq::dither` (C++/CUDA,
csrc/fsq_dither.cpp) and `fsq_triton::dither` (fsq_kernels/triton/dither.py); the reference is
fsq_kernels.dither (docs/dither.md). Both namespaces have the same schemas:

    dither(codes, z, key_offset, steps, mode, p, channel_first) -> out
    dither_backward(grad_out, codes, z, key_offset, steps, mode, p, channel_first)
        -> (grad_codes, grad_z)          grad_z: an empty tensor for mode "peer"

mode: 0 = "peer", 1 = "taae"; steps: the float32 2/(L-1) of each channel of a codebook;
key_offset: the int64 [key, offset] tensor on z's device. Outputs are contiguous. Autograd saves
codes, z and the 16-byte key_offset; the backward is one launch that regenerates the words.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dither as reference_dither
from . import _reference, backends, native
from . import _validate_float_tensor, validate_levels  # defined before ops/__init__ imports this module

__all__ = ["dither", "fused_dither", "has_fused_dither", "steps"]

MODES = {"peer": 0, "taae": 1}


def steps(levels) -> list[float]:
    """2/(L-1) of each channel, rounded to float32: the one derivation (fsq_kernels.dither)."""
    return list(reference_dither.steps(levels))


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx, inputs, output):
        codes, z, key_offset, step_list, mode, p, channel_first = inputs
        ctx.save_for_backward(codes, z, key_offset)
        ctx.args = (step_list, mode, p, channel_first)

    def backward(ctx, grad_out):
        codes, z, key_offset = ctx.saved_tensors
        grad_codes, grad_z = ops.dither_backward(grad_out.contiguous(), codes, z, key_offset, *ctx.args)
        return grad_codes, (grad_z if ctx.args[1] == MODES["taae"] else None), None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::dither", backward, setup_context=setup)


def _native_has_dither() -> bool:
    return native._C is not None and hasattr(torch.ops.fsq, "dither")


if _native_has_dither():

    @torch.library.register_fake("fsq::dither")
    def _dither_fake(codes, z, key_offset, step_list, mode, p, channel_first):
        return torch.empty_like(codes, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fsq::dither_backward")
    def _dither_backward_fake(grad_out, codes, z, key_offset, step_list, mode, p, channel_first):
        grad_z = torch.empty_like(z, memory_format=torch.contiguous_format) if mode == MODES["taae"] else z.new_empty((0,))
        return torch.empty_like(codes, memory_format=torch.contiguous_format), grad_z

    _register("fsq")

_triton_module = backends.module("triton") if "triton" in backends._MODULES else None

if _triton_module is not None:
    from torch.library import triton_op

    from ..triton import dither as _kernels
    from .triton import _wrap

    @triton_op("fsq_triton::dither", mutates_args=())
    def _dither_op(codes: Tensor, z: Tensor, key_offset: Tensor, step_list: list[float], mode: int, p: float,
                   channel_first: bool) -> Tensor:
        return _kernels.dither_forward(codes, z, key_offset, tuple(step_list), mode, p, channel_first, wrap=_wrap(z))

    @triton_op("fsq_triton::dither_backward", mutates_args=())
    def _dither_backward_op(grad_out: Tensor, codes: Tensor, z: Tensor, key_offset: Tensor, step_list: list[float],
                            mode: int, p: float, channel_first: bool) -> tuple[Tensor, Tensor]:
        return _kernels.dither_backward(grad_out, codes, z, key_offset, mode, p, channel_first, wrap=_wrap(z))

    _register("fsq_triton")


def has_fused_dither(runner) -> bool:
    """Whether the backend module `runner` (backends.resolve) has a fused dither kernel."""
    if runner is native:
        return _native_has_dither()
    return runner is not None and runner is _triton_module


def fused_dither(codes: Tensor, z: Tensor, levels: tuple, mode: str, p: float, key_offset: Tensor,
                 channel_first: bool, runner) -> Tensor:
    """The dithered output (contiguous, codes' dtype) on the backend `runner`; arguments valid."""
    if runner is _reference or not has_fused_dither(runner):
        return reference_dither.apply(codes, z, levels, mode, p, key_offset, channel_first)
    namespace = torch.ops.fsq if runner is native else torch.ops.fsq_triton
    return namespace.dither(codes, z, key_offset, steps(levels), MODES[mode], float(p), bool(channel_first))


def dither(
    codes: Tensor,
    z: Tensor,
    levels,
    *,
    mode: str = "peer",
    p: float,
    key_offset: Tensor | None = None,
    channel_first: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Dither the noiseless `codes` of `z` (quantize(z, levels, variant="symmetric")'s output, z's
    shape and dtype) as training does: mode "peer" (vector-quantize-pytorch's noise_dropout=p) or
    "taae" (stable-audio-tools' DitheredFSQ with noise_dropout=p); docs/dither.md. key_offset: the
    int64 [key, offset] tensor on z's device (default: fsq_kernels.dither.draw_key_offset, from the
    device's torch generator). Differentiable with respect to codes and z; contiguous output."""
    caller = "fsq_kernels.dither"
    levels = validate_levels(levels, caller)
    if mode not in MODES:
        raise ValueError(f"{caller}: mode must be one of {list(MODES)}; got {mode!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{caller}: p must be a float in [0, 1]; got {p!r}")
    _validate_float_tensor(z, "z", caller)
    _validate_float_tensor(codes, "codes", caller)
    channels = z.shape[1 if channel_first else -1] if z.dim() >= (2 if channel_first else 1) else 0
    if channels == 0 or channels % len(levels):
        raise ValueError(f"{caller}: z must have a multiple of len(levels)={len(levels)} channels on dim "
                         f"{1 if channel_first else -1}; got shape {tuple(z.shape)}")
    if codes.shape != z.shape or codes.dtype != z.dtype or codes.device != z.device:
        raise ValueError(f"{caller}: codes must have z's shape, dtype and device {tuple(z.shape)}, {z.dtype}, "
                         f"{z.device}; got {tuple(codes.shape)}, {codes.dtype}, {codes.device}")
    if key_offset is None:
        key_offset = reference_dither.draw_key_offset(z.device)
    elif (not isinstance(key_offset, Tensor) or key_offset.dtype != torch.int64 or key_offset.shape != (2,)
          or key_offset.device != z.device):
        raise ValueError(f"{caller}: key_offset must be an int64 tensor of shape (2,) on {z.device}; got "
                         f"{key_offset.dtype if isinstance(key_offset, Tensor) else type(key_offset).__name__}")
    runner = backends.resolve(backend, z.device, z.dtype, levels, caller)
    return fused_dither(codes, z, levels, mode, float(p), key_offset, bool(channel_first), runner)
