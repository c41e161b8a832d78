"""The Triton backend of the op layer: torch.library registration, fake impls, autograd.

Ops (namespace ``fsq_triton``), each a ``torch.library.triton_op`` whose body launches the
kernels of ``fsq_kernels/triton/fsq.py`` through ``torch.library.wrap_triton``; triton_op
derives the fake (meta) implementation from the same body (it only allocates outputs from
shapes), and ``torch.compile`` sees the kernels themselves rather than an opaque call.

* ``fsq_triton::quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks,
  return_indices) -> (codes, indices)``: indices is an empty int tensor when not requested.
* ``fsq_triton::quantize_backward(z, grad_codes, levels, variant, hard_clamp, channel_first,
  num_codebooks) -> grad_z``.
* ``fsq_triton::indices_to_codes(indices, levels, variant, channel_first, num_codebooks,
  dtype) -> codes``.
* ``fsq_triton::residual_quantize(x, levels, num_stages, hard_clamp, soft_clamp, channel_first,
  active_stages) -> (out, indices)`` and ``fsq_triton::residual_quantize_backward(x, grad_out,
  ...same arguments) -> grad_x``: fused residual FSQ (kernels in ``fsq_kernels/triton/residual.py``).

Autograd: ``quantize`` saves only z (in its own dtype) and its backward is one launch of
``quantize_backward`` (straight-through across the round, true derivative of the bound);
``residual_quantize`` saves only x and its backward is one launch of
``residual_quantize_backward``, which recomputes the stages from x.
Arguments arrive validated by ``fsq_kernels.ops`` (docs/BACKENDS.md); nothing here reads
tensor values on the host, so forward and backward never synchronize with the device.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:  # the interpreter (TRITON_INTERPRET=1) must be chosen before this import
    import triton  # noqa: F401

    from ..triton import fsq as _k
    from ..triton import residual as _rk

    _TRITON_IMPORTS = True
except ImportError:  # pragma: no cover - depends on the environment
    _k = None
    _rk = None
    _TRITON_IMPORTS = False

__all__ = ["indices_to_codes", "is_available", "quantize", "residual_quantize"]


def is_available(device_type: str) -> bool:
    """True when triton imports and kernels can run on `device_type` tensors: CUDA tensors on
    a visible GPU, CPU (or CUDA) tensors under TRITON_INTERPRET=1."""
    if not _TRITON_IMPORTS:
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        return torch.cuda.is_available() or interpret
    if device_type == "cpu":
        return interpret
    return False


class _SkipLaunch:
    """Stands in for a kernel when only output metadata is wanted (see _wrap)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _wrap(t: Tensor):
    """wrap_triton, except under the interpreter with fake/meta tensors: wrap_triton hands
    interpreted kernels straight to the interpreter, which cannot run on fake tensors, so the
    fake implementation (the op body, as triton_op registers it) only allocates outputs."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.library import wrap_triton

    if os.environ.get("TRITON_INTERPRET") == "1" and (t.device.type == "meta" or is_fake(t)):
        return _SkipLaunch
    return wrap_triton


if _TRITON_IMPORTS:
    from torch.library import triton_op

    @triton_op("fsq_triton::quantize", mutates_args=())
    def _quantize_op(
        z: Tensor,
        levels: list[int],
        variant: str,
        hard_clamp: bool,
        channel_first: bool,
        num_codebooks: int,
        return_indices: bool,
    ) -> tuple[Tensor, Tensor]:
        codes, indices = _k.fsq_forward(
            z, tuple(levels), variant, hard_clamp, channel_first, num_codebooks, return_indices,
            wrap=_wrap(z),
        )
        if indices is None:
            indices = torch.empty(0, dtype=torch.int32, device=z.device)
        return codes, indices

    @triton_op("fsq_triton::quantize_backward", mutates_args=())
    def _quantize_backward_op(
        z: Tensor,
        grad_codes: Tensor,
        levels: list[int],
        variant: str,
        hard_clamp: bool,
        channel_first: bool,
        num_codebooks: int,
    ) -> Tensor:
        return _k.fsq_backward(
            z, grad_codes, tuple(levels), variant, hard_clamp, channel_first, num_codebooks,
            wrap=_wrap(z),
        )

    @triton_op("fsq_triton::indices_to_codes", mutates_args=())
    def _indices_to_codes_op(
        indices: Tensor,
        levels: list[int],
        variant: str,
        channel_first: bool,
        num_codebooks: int,
        dtype: torch.dtype,
    ) -> Tensor:
        return _k.fsq_decode(
            indices, tuple(levels), variant, channel_first, num_codebooks, dtype, wrap=_wrap(indices)
        )

    def _setup_context(ctx, inputs, output):
        z, levels, variant, hard_clamp, channel_first, num_codebooks, _ = inputs
        ctx.save_for_backward(z)  # only z, in its own dtype
        ctx.fsq_args = (list(levels), variant, hard_clamp, channel_first, num_codebooks)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_codes, grad_indices):
        (z,) = ctx.saved_tensors
        if grad_codes is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        grad_z = torch.ops.fsq_triton.quantize_backward(z, grad_codes, *ctx.fsq_args)
        return grad_z, None, None, None, None, None, None

    torch.library.register_autograd("fsq_triton::quantize", _backward, setup_context=_setup_context)

    @triton_op("fsq_triton::residual_quantize", mutates_args=())
    def _residual_quantize_op(
        x: Tensor,
        levels: list[int],
        num_stages: int,
        hard_clamp: bool,
        soft_clamp: Optional[list[float]],
        channel_first: bool,
        active_stages: int,
    ) -> tuple[Tensor, Tensor]:
        return _rk.residual_forward(
            x, tuple(levels), num_stages, hard_clamp, soft_clamp, channel_first, active_stages,
            wrap=_wrap(x),
        )

    @triton_op("fsq_triton::residual_quantize_backward", mutates_args=())
    def _residual_quantize_backward_op(
        x: Tensor,
        grad_out: Tensor,
        levels: list[int],
        num_stages: int,
        hard_clamp: bool,
        soft_clamp: Optional[list[float]],
        channel_first: bool,
        active_stages: int,
    ) -> Tensor:
        return _rk.residual_backward(
            x, grad_out, tuple(levels), num_stages, hard_clamp, soft_clamp, channel_first,
            active_stages, wrap=_wrap(x),
        )

    def _residual_setup_context(ctx, inputs, output):
        x, levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages = inputs
        ctx.save_for_backward(x)  # only x, in its own dtype: the backward recomputes the stages
        ctx.fsq_args = (list(levels), num_stages, hard_clamp,
                        None if soft_clamp is None else list(soft_clamp), channel_first, active_stages)
        ctx.set_materialize_grads(False)

    def _residual_backward(ctx, grad_out, grad_indices):
        (x,) = ctx.saved_tensors
        if grad_out is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        grad_x = torch.ops.fsq_triton.residual_quantize_backward(x, grad_out, *ctx.fsq_args)
        return grad_x, None, None, None, None, None, None

    torch.library.register_autograd(
        "fsq_triton::residual_quantize", _residual_backward, setup_context=_residual_setup_context
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
    """(codes in z.dtype, indices or None); differentiable with respect to z."""
    codes, indices = torch.ops.fsq_triton.quantize(
        z, list(levels), variant, bool(hard_clamp), bool(channel_first), int(num_codebooks),
        bool(return_indices),
    )
    return codes, (indices if return_indices else None)


def indices_to_codes(
    indices: Tensor,
    levels: tuple[int, ...],
    variant: str,
    channel_first: bool,
    num_codebooks: int,
    dtype: torch.dtype | None,
) -> Tensor:
    """Codes (float32 unless dtype is given) from indices, channel-last or channel-first."""
    return torch.ops.fsq_triton.indices_to_codes(
        indices, list(levels), variant, bool(channel_first), int(num_codebooks),
        torch.float32 if dtype is None else dtype,
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
    dropped stages and NaN tokens); differentiable with respect to x."""
    return torch.ops.fsq_triton.residual_quantize(
        x, list(levels), int(num_stages), bool(hard_clamp),
        None if soft_clamp is None else [float(c) for c in soft_clamp],
        bool(channel_first), int(active_stages),
    )
