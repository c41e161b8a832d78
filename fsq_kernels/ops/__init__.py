"""The op layer: the public functional API and its input validation.

Every public call is validated here (kernels assume valid input), then handed to the backend
module that `backends.resolve` picks (docs/design.md, "Backends"): the reference, the C++/CUDA
extension (`native`) or Triton. Each fused backend's module owns its torch.library registration,
fake implementations and autograd. Nothing here imports, reads tensor values on the host, or
syncs with a device inside a call, so torch.compile(fullgraph=True) and torch.export trace it
(the one data-dependent check, the CPU index range, has a traceable form; see _check_index_range).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor

from .. import dither as reference_dither
from .. import reference
from .backends import BACKENDS, available_backends, resolve  # noqa: F401  (BACKENDS: re-exported)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = [
    "accumulate_usage", "available_backends", "codes_to_indices", "indices_to_codes", "perplexity",
    "quantize", "quantize_train", "residual_quantize", "usage_fraction",
    "validate_levels",
]


# ---------------------------------------------------------------------------------------------
# Validation (the public boundary)
# ---------------------------------------------------------------------------------------------


def validate_levels(levels, caller: str = "levels") -> tuple[int, ...]:
    """levels as a tuple of Python ints, each >= 2; ValueError naming what is wrong otherwise."""
    if isinstance(levels, Tensor):
        levels = levels.tolist()
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(f"{caller}: levels must be a non-empty sequence of ints >= 2; got {levels!r}")
    if len(levels) == 0:
        raise ValueError(f"{caller}: levels must be a non-empty sequence of ints >= 2; got an empty {type(levels).__name__}")
    out = []
    for i, level in enumerate(levels):
        if isinstance(level, bool) or not isinstance(level, numbers.Integral):
            raise ValueError(f"{caller}: levels[{i}] must be an int >= 2; got {level!r} ({type(level).__name__})")
        if level < 2:
            raise ValueError(f"{caller}: levels[{i}] must be >= 2; got {int(level)}")
        out.append(int(level))
    return tuple(out)


def _validate_variant(variant, hard_clamp, caller: str, levels=()) -> None:
    if variant not in reference.VARIANTS:
        raise ValueError(f"{caller}: variant must be one of {list(reference.VARIANTS)}; got {variant!r}")
    if hard_clamp and variant in ("paper", "ifsq"):
        raise ValueError(
            f"{caller}: hard_clamp=True applies to the 'atanh' and 'symmetric' variants; got variant={variant!r}"
        )
    if variant == "ifsq":  # iFSQ's bound has no offset: its published code asserts odd levels
        for i, level in enumerate(levels):
            if level % 2 == 0:
                raise ValueError(f"{caller}: variant 'ifsq' needs odd levels; got levels[{i}] = {level}")


def _validate_num_codebooks(num_codebooks, caller: str) -> int:
    if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, numbers.Integral) or num_codebooks < 1:
        raise ValueError(f"{caller}: num_codebooks must be an int >= 1; got {num_codebooks!r}")
    return int(num_codebooks)


def _validate_float_tensor(x, name: str, caller: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{caller}: {name} must be float16, bfloat16, float32 or float64; got {x.dtype}"
        )


def _validate_channels(x: Tensor, name: str, levels, num_codebooks: int, channel_first: bool, caller: str) -> None:
    min_dims = 2 if channel_first else 1
    if x.dim() < min_dims:
        layout = "(B, C, ...) for channel_first=True" if channel_first else "(..., C)"
        raise ValueError(f"{caller}: {name} must have shape {layout}; got shape {tuple(x.shape)}")
    axis = 1 if channel_first else -1
    expected = len(levels) * num_codebooks
    if x.shape[axis] != expected:
        raise ValueError(
            f"{caller}: {name} must have {expected} channels (len(levels)={len(levels)} x "
            f"num_codebooks={num_codebooks}) on dim {axis}; got {x.shape[axis]} (shape {tuple(x.shape)})"
        )


def _validate_quantize_input(z, levels, variant, hard_clamp, channel_first, num_codebooks, caller: str):
    """quantize's and quantize_train's checks of z and the level set: (levels, num_codebooks)."""
    levels = validate_levels(levels, caller)
    _validate_variant(variant, hard_clamp, caller, levels)
    num_codebooks = _validate_num_codebooks(num_codebooks, caller)
    _validate_float_tensor(z, "z", caller)
    _validate_channels(z, "z", levels, num_codebooks, channel_first, caller)
    return levels, num_codebooks


def _validate_active_stages(active_stages, num_stages: int, x, caller: str):
    """None (every stage), or a 0-d integer tensor on x's device for the backends."""
    if isinstance(active_stages, Tensor):
        if active_stages.dim() != 0 or active_stages.is_floating_point() or active_stages.dtype == torch.bool:
            raise ValueError(
                f"{caller}: active_stages must be an int or a 0-d integer tensor; got a {active_stages.dtype} "
                f"tensor of shape {tuple(active_stages.shape)}"
            )
        if active_stages.device != x.device:
            raise ValueError(f"{caller}: active_stages must be on x's device {x.device}; got {active_stages.device}")
        return active_stages
    if active_stages is None:
        return None
    if isinstance(active_stages, bool) or not isinstance(active_stages, numbers.Integral) or not 0 <= active_stages <= num_stages:
        raise ValueError(f"{caller}: active_stages must be an int in [0, num_stages={num_stages}]; got {active_stages!r}")
    if active_stages == num_stages:
        return None
    return torch.full((), int(active_stages), dtype=torch.int64, device=x.device)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def quantize(
    z: Tensor,
    levels: Sequence[int],
    *,
    variant: str = "paper",
    hard_clamp: bool = False,
    channel_first: bool = False,
    num_codebooks: int = 1,
    return_indices: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Quantize z to the FSQ grid: (codes in z's dtype, indices) — (codes, None) without indices.

    z is channel-last (..., C) or, with channel_first=True, (B, C, ...), C = len(levels) *
    num_codebooks. Indices have z's shape without the channel axis (plus a trailing axis of size
    num_codebooks when > 1), int32 up to 2^31-1 codes and int64 beyond; -1 marks a codebook with a
    NaN channel. Gradients are straight-through across the round; the bound keeps its derivative.
    """
    caller = "fsq_kernels.quantize"
    levels, num_codebooks = _validate_quantize_input(z, levels, variant, hard_clamp, channel_first, num_codebooks, caller)
    runner = resolve(backend, z.device, z.dtype, levels, caller)
    return runner.quantize(
        z, levels, variant, bool(hard_clamp), bool(channel_first), num_codebooks, bool(return_indices)
    )


def _validate_key_offset(key_offset, z: Tensor, caller: str) -> None:
    if not isinstance(key_offset, Tensor):
        raise TypeError(f"{caller}: key_offset must be a torch.Tensor (int64 [key, offset]); got {type(key_offset).__name__}")
    if key_offset.dtype != torch.int64:
        raise TypeError(f"{caller}: key_offset must be int64; got {key_offset.dtype}")
    if tuple(key_offset.shape) != (2,) or key_offset.device != z.device:
        raise ValueError(f"{caller}: key_offset must have shape (2,) and be on z's device {z.device}; got shape "
                         f"{tuple(key_offset.shape)} on {key_offset.device}")


def quantize_train(
    z: Tensor,
    levels: Sequence[int],
    *,
    variant: str = "paper",
    hard_clamp: bool = False,
    channel_first: bool = False,
    num_codebooks: int = 1,
    dither: str | None = None,
    dither_p: float = 0.0,
    key_offset: Tensor | None = None,
    return_usage: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The training forward in one fused launch: (codes, indices, usage).

    codes: quantize's codes, dithered when `dither` is "peer" (vector-quantize-pytorch's
    noise_dropout=dither_p) or "taae" (stable-audio-tools' DitheredFSQ), both on the "symmetric"
    grid (docs/dither.md); exactly fsq_kernels.dither.apply(quantize(z), z, ...). indices: the
    noiseless code's, as quantize gives them. usage (return_usage=True, else None): the
    (num_codebooks, prod(levels)) int64 histogram of these indices (-1 skipped), counted in the
    same pass. key_offset: the int64 [key, offset] tensor on z's device that fixes the noise
    (default: fsq_kernels.dither.draw_key_offset, from the device's torch generator). Gradients:
    the straight-through estimator through the dither (the backward regenerates the noise).
    """
    caller = "fsq_kernels.quantize_train"
    levels, num_codebooks = _validate_quantize_input(z, levels, variant, hard_clamp, channel_first, num_codebooks, caller)
    if dither is not None and dither not in reference_dither.MODES:
        raise ValueError(f"{caller}: dither must be None or one of {list(reference_dither.MODES)}; got {dither!r}")
    if isinstance(dither_p, bool) or not isinstance(dither_p, numbers.Real) or not 0.0 <= dither_p <= 1.0:
        raise ValueError(f"{caller}: dither_p must be a float in [0, 1]; got {dither_p!r}")
    if dither is not None and variant != "symmetric":
        raise ValueError(f"{caller}: dither={dither!r} needs variant 'symmetric'; got variant={variant!r}")
    if dither is None:
        key_offset = None
    elif key_offset is None:
        key_offset = reference_dither.draw_key_offset(z.device)
    else:
        _validate_key_offset(key_offset, z, caller)
    if return_usage and reference.codebook_size(levels) > reference.MAX_MATERIALIZED_CODEBOOK:
        raise ValueError(f"{caller}: return_usage=True needs at most {reference.MAX_MATERIALIZED_CODEBOOK} codes per "
                         f"codebook; got prod(levels) = {reference.codebook_size(levels)}")
    runner = resolve(backend, z.device, z.dtype, levels, caller, "quantize_train")
    return runner.quantize_train(z, levels, variant, bool(hard_clamp), bool(channel_first), num_codebooks, dither,
                                 float(dither_p), key_offset, bool(return_usage))


def _check_index_range(indices: Tensor, levels, caller: str) -> None:
    """CPU indices must lie in [0, prod(levels)).

    Eager: ValueError naming the first bad value. Under torch.compile / torch.export the values are
    not known while tracing, so the check becomes an op in the graph (torch._assert_async) that
    raises RuntimeError when the compiled program runs. CUDA indices are not checked: the check
    would need a host sync (documented in the README)."""
    if indices.device.type != "cpu":
        return
    size = reference.codebook_size(levels)
    message = f"{caller}: indices must lie in [0, {size}) for levels {list(levels)}"
    if torch.compiler.is_compiling():
        torch._assert_async(((indices >= 0) & (indices < size)).all(), message)
        return
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= size:
        raise ValueError(f"{message}; got {low if low < 0 else high}")


def indices_to_codes(
    indices: Tensor,
    levels: Sequence[int],
    *,
    variant: str = "paper",
    channel_first: bool = False,
    num_codebooks: int = 1,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Tensor:
    """Decode indices to codes without a materialized codebook.

    Output is channel-last (..., C), or (B, C, ...) with channel_first=True. Indices outside
    [0, prod(levels)) raise ValueError for CPU tensors; on CUDA the check would need a host sync,
    so out-of-range CUDA indices decode to unspecified codes.
    """
    caller = "fsq_kernels.indices_to_codes"
    levels = validate_levels(levels, caller)
    _validate_variant(variant, False, caller, levels)
    num_codebooks = _validate_num_codebooks(num_codebooks, caller)
    if not isinstance(indices, Tensor):
        raise TypeError(f"{caller}: indices must be a torch.Tensor; got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{caller}: indices must be an integer tensor; got {indices.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{caller}: dtype must be float16, bfloat16, float32 or float64; got {dtype}")
    if num_codebooks > 1 and (indices.dim() == 0 or indices.shape[-1] != num_codebooks):
        raise ValueError(
            f"{caller}: indices must have a trailing axis of size num_codebooks={num_codebooks}; "
            f"got shape {tuple(indices.shape)}"
        )
    min_dims = 1 + (num_codebooks > 1) if channel_first else 0
    if indices.dim() < min_dims:
        raise ValueError(f"{caller}: channel_first=True needs a batch axis; got indices of shape {tuple(indices.shape)}")
    _check_index_range(indices, levels, caller)
    runner = resolve(backend, indices.device, dtype, levels, caller, "indices_to_codes")
    return runner.indices_to_codes(indices, levels, variant, bool(channel_first), num_codebooks, dtype)


def codes_to_indices(
    codes: Tensor,
    levels: Sequence[int],
    *,
    variant: str = "paper",
    channel_first: bool = False,
    num_codebooks: int = 1,
) -> Tensor:
    """Snap codes to the nearest grid point and return their indices (exact inverse of decode for
    float32/float64 codes; bfloat16 codes are exact while every L <= 256)."""
    caller = "fsq_kernels.codes_to_indices"
    levels = validate_levels(levels, caller)
    _validate_variant(variant, False, caller, levels)
    num_codebooks = _validate_num_codebooks(num_codebooks, caller)
    _validate_float_tensor(codes, "codes", caller)
    _validate_channels(codes, "codes", levels, num_codebooks, channel_first, caller)
    return reference.codes_to_indices(
        codes, levels, variant=variant, channel_first=bool(channel_first), num_codebooks=num_codebooks
    )


def residual_quantize(
    x: Tensor,
    levels: Sequence[int],
    num_stages: int,
    *,
    hard_clamp: bool = True,
    soft_clamp: Sequence[float] | None = None,
    channel_first: bool = False,
    active_stages: int | Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Residual FSQ over num_stages stages (vector-quantize-pytorch's ResidualFSQ quantization).

    x (..., d) or (B, d, ...) with d = len(levels) is soft-clamped (tanh(x / c) * c) when
    soft_clamp is given; stage s quantizes residual / L^-s with the `symmetric` variant. Returns
    (sum of the stages' scaled codes, indices) with indices (..., num_stages), or (B, num_stages,
    ...) for channel-first input. Stages from active_stages on are dropped (index -1): an int, or a
    0-d integer tensor on x's device (quantize dropout draws it there, so nothing syncs with the
    host and a compiled or exported graph keeps it as data).
    """
    caller = "fsq_kernels.residual_quantize"
    levels = validate_levels(levels, caller)
    if isinstance(num_stages, bool) or not isinstance(num_stages, numbers.Integral) or num_stages < 1:
        raise ValueError(f"{caller}: num_stages must be an int >= 1; got {num_stages!r}")
    num_stages = int(num_stages)
    if soft_clamp is not None:
        soft_clamp = tuple(float(c) for c in soft_clamp)
        if len(soft_clamp) != len(levels) or any(not c > 0 for c in soft_clamp):
            raise ValueError(
                f"{caller}: soft_clamp must hold {len(levels)} positive values (one per channel); got {list(soft_clamp)}"
            )
    _validate_float_tensor(x, "x", caller)
    _validate_channels(x, "x", levels, 1, channel_first, caller)
    active_stages = _validate_active_stages(active_stages, num_stages, x, caller)
    runner = resolve(backend, x.device, x.dtype, levels, caller, "residual_quantize")
    return runner.residual_quantize(
        x, levels, num_stages, bool(hard_clamp), soft_clamp, bool(channel_first), active_stages
    )


from .usage_ops import accumulate_usage, perplexity, usage_fraction  # noqa: E402  (issue 16)
