"""The Triton backend of the op layer: torch.library registration and the kernels' constexprs.

Ops (namespace ``fsq_triton``, the schemas of ``fsq::``: fsq_kernels/ops/registration.py), each
a ``torch.library.triton_op`` whose body launches the kernels of ``fsq_kernels/triton/`` through
``torch.library.wrap_triton``; triton_op derives the fake (meta) implementation from the same
body (it only allocates outputs from shapes), and ``torch.compile`` sees the kernels themselves
rather than an opaque call. Autograd is the helper shared with ``fsq::``.

Each op receives its table (fsq_kernels/ops/tables.py); ``payload`` turns it into the kernels'
constexprs (boundaries, shifts, gradient coefficients, stage scales), so Triton consumes the
same numbers as the C++ and CUDA kernels. Arguments arrive validated by ``fsq_kernels.ops``;
nothing here reads tensor values on the host, so forward and backward never synchronize with
the device.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference, shapes
from . import registration, tables

try:  # the interpreter (TRITON_INTERPRET=1) must be chosen before this import
    import triton  # noqa: F401

    from ..triton import dither as _dk
    from ..triton import fsq as _k
    from ..triton import residual as _rk

    _TRITON_IMPORTS = True
except ImportError:  # pragma: no cover - depends on the environment
    _k = _dk = None
    _rk = None
    _TRITON_IMPORTS = False

__all__ = ["indices_to_codes", "is_available", "payload", "quantize", "quantize_train", "residual_quantize",
           "supports"]

MAX_CHANNELS = 64  # channels per codebook: one constexpr lane each


def supports(levels: tuple[int, ...]) -> bool:
    """Level sets the Triton kernels take: at most 64 channels per codebook (any L; above
    CMP_MAX_LEVELS the forward takes the inexact tanh path, README "How exact is exact?")."""
    return len(levels) <= MAX_CHANNELS


@functools.cache
def payload(levels: tuple, variant: str, hard_clamp: bool, table: tuple, soft_clamp=None, num_stages: int = 0) -> dict:
    """The constexprs of one launch, from the op's table: LEVELS, BASIS, NUM_CODES, INDEX_64,
    USE_CMP, BOUNDS (per channel, empty on the tanh path), MAX_B, HALF_L, OFFSET, SHIFT,
    GRAD_SCALE, IN_SCALE, and for residual ops SCALES (num_stages rows) and SOFT (float32 soft clamp)."""
    d = len(levels)
    fields, rows, extra = tables.split(table, d)
    use_cmp = max(levels) <= _k.CMP_MAX_LEVELS  # the exact comparison path, else the tanh path
    if use_cmp:  # every boundary finite: k0 == 0, L - 1 of them
        assert all(len(row) == level - 1 for row, level in zip(rows, levels)), "table does not match levels"
    num_codes = math.prod(levels)
    out = dict(
        LEVELS=tuple(levels), BASIS=tuple(reference.basis(levels)), NUM_CODES=num_codes,
        INDEX_64=shapes.index_dtype(levels) == torch.int64, USE_CMP=use_cmp,
        BOUNDS=tuple(tuple(row) for row in rows) if use_cmp else (),
        MAX_B=max(levels) - 1 if use_cmp else 0,
        HALF_L=tuple(fields["half_l"]), OFFSET=tuple(fields["offset"]), SHIFT=tuple(fields["shift"]),
        GRAD_SCALE=tuple(fields["grad_coef"]), IN_SCALE=tuple(fields["input_scale"]),
    )
    if num_stages:
        out["SCALES"] = tuple(tuple(extra[s * d:(s + 1) * d]) for s in range(num_stages))
        out["SOFT"] = () if soft_clamp is None else tuple(tables.round_to(c, torch.float32) for c in soft_clamp)
    return out


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
        z: Tensor, levels: list[int], variant: str, hard_clamp: bool, channel_first: bool,
        num_codebooks: int, return_indices: bool, table: list[float],
    ) -> tuple[Tensor, Tensor]:
        cst = payload(tuple(levels), variant, hard_clamp, tuple(table))
        codes, indices = _k.fsq_forward(
            z, cst, _k.VARIANTS[variant], hard_clamp, channel_first, num_codebooks, return_indices, wrap=_wrap(z),
        )
        if indices is None:
            indices = torch.empty(0, dtype=shapes.index_dtype(levels), device=z.device)
        return codes, indices

    def _dither(key_offset, dither_mode: int, dither_p: float, dither_steps) -> "_dk.DitherArgs | None":
        if dither_mode == _dk.NONE:
            return None
        return _dk.DitherArgs(int(dither_mode), float(dither_p), tuple(dither_steps), key_offset)

    @triton_op("fsq_triton::quantize_backward", mutates_args=(), schema=registration.QUANTIZE_BACKWARD_SCHEMA)
    def _quantize_backward_op(grad_codes, z, levels, variant, hard_clamp, channel_first, num_codebooks, table,
                              key_offset=None, dither_mode=0, dither_p=0.0, dither_steps=()):
        cst = payload(tuple(levels), variant, hard_clamp, tuple(table))
        return _k.fsq_backward(
            grad_codes, z, cst, _k.VARIANTS[variant], hard_clamp, channel_first, num_codebooks, wrap=_wrap(z),
            dither=_dither(key_offset, dither_mode, dither_p, dither_steps),
        )

    @triton_op("fsq_triton::quantize_train", mutates_args=(), schema=registration.QUANTIZE_TRAIN_SCHEMA)
    def _quantize_train_op(z, levels, variant, hard_clamp, channel_first, num_codebooks, table, key_offset,
                           dither_mode, dither_p, dither_steps, return_usage):
        cst = payload(tuple(levels), variant, hard_clamp, tuple(table))
        usage = torch.zeros((num_codebooks, cst["NUM_CODES"]) if return_usage else (0,), dtype=torch.int64,
                            device=z.device)
        codes, indices = _k.fsq_forward(
            z, cst, _k.VARIANTS[variant], hard_clamp, channel_first, num_codebooks, True, wrap=_wrap(z),
            dither=_dither(key_offset, dither_mode, dither_p, dither_steps), usage=usage if return_usage else None,
        )
        return codes, indices, usage

    @triton_op("fsq_triton::indices_to_codes", mutates_args=())
    def _indices_to_codes_op(
        indices: Tensor, levels: list[int], variant: str, channel_first: bool, num_codebooks: int,
        dtype: torch.dtype, table: list[float],
    ) -> Tensor:
        cst = payload(tuple(levels), variant, False, tuple(table))
        return _k.fsq_decode(
            indices, cst, _k.VARIANTS[variant], channel_first, num_codebooks, dtype, wrap=_wrap(indices)
        )

    @triton_op("fsq_triton::residual_quantize", mutates_args=())
    def _residual_quantize_op(
        x: Tensor, levels: list[int], num_stages: int, hard_clamp: bool, soft_clamp: Optional[list[float]],
        channel_first: bool, active_stages: Optional[Tensor], table: list[float],
    ) -> tuple[Tensor, Tensor]:
        soft = None if soft_clamp is None else tuple(soft_clamp)
        cst = payload(tuple(levels), "symmetric", hard_clamp, tuple(table), soft, num_stages)
        return _rk.residual_forward(x, cst, hard_clamp, channel_first, active_stages, wrap=_wrap(x))

    @triton_op("fsq_triton::residual_quantize_backward", mutates_args=())
    def _residual_quantize_backward_op(
        grad_out: Tensor, x: Tensor, levels: list[int], num_stages: int, hard_clamp: bool,
        soft_clamp: Optional[list[float]], channel_first: bool, active_stages: Optional[Tensor],
        table: list[float],
    ) -> Tensor:
        soft = None if soft_clamp is None else tuple(soft_clamp)
        cst = payload(tuple(levels), "symmetric", hard_clamp, tuple(table), soft, num_stages)
        return _rk.residual_backward(grad_out, x, cst, hard_clamp, channel_first, active_stages, wrap=_wrap(x))

    registration.register_autograd("fsq_triton")


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
    table = tables.quantize_table(levels, variant, hard_clamp, z.dtype)
    codes, indices = torch.ops.fsq_triton.quantize(
        z, list(levels), variant, bool(hard_clamp), bool(channel_first), int(num_codebooks), bool(return_indices), table,
    )
    return codes, (indices if return_indices else None)


def quantize_train(z: Tensor, levels: tuple[int, ...], variant: str, hard_clamp: bool, channel_first: bool,
                   num_codebooks: int, dither: str | None, dither_p: float, key_offset: Tensor | None,
                   return_usage: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The training forward in one launch: (dithered codes, noiseless indices, histogram or None)."""
    return registration.quantize_train(torch.ops.fsq_triton, z, levels, variant, hard_clamp, channel_first,
                                       num_codebooks, dither, dither_p, key_offset, return_usage)


def indices_to_codes(
    indices: Tensor,
    levels: tuple[int, ...],
    variant: str,
    channel_first: bool,
    num_codebooks: int,
    dtype: torch.dtype | None,
) -> Tensor:
    """Codes (float32 unless dtype is given) from indices, channel-last or channel-first."""
    dtype = torch.float32 if dtype is None else dtype
    table = tables.quantize_table(levels, variant, False, dtype)
    return torch.ops.fsq_triton.indices_to_codes(
        indices, list(levels), variant, bool(channel_first), int(num_codebooks), dtype, table,
    )


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
    dropped stages and NaN tokens); differentiable with respect to x.
    active_stages: None (every stage) or a 0-d integer tensor on x's device."""
    table = tables.residual_table(levels, num_stages, hard_clamp, x.dtype)
    return torch.ops.fsq_triton.residual_quantize(
        x, list(levels), int(num_stages), bool(hard_clamp),
        None if soft_clamp is None else [float(c) for c in soft_clamp],
        bool(channel_first), registration.active_stages_tensor(active_stages, int(num_stages), x.device), table,
    )
