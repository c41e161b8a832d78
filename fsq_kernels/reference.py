"""Pure-PyTorch FSQ: the oracle every backend is validated against.

This module is the executable form of the math contract (docs/design.md). It favours
clarity over speed; inputs are assumed valid (the op layer validates the public boundary).
Math runs in float64 for float64 inputs and in float32 otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from .exact import f32 as _f32
from .exact import round_boundary_f32 as _round_boundary_f32
from .exact import sign_of_boundary_minus as _sign_of_boundary_minus

EPS = 1e-3
VARIANTS = ("paper", "atanh", "symmetric", "ifsq")
IFSQ_INPUT_SCALE = 0.8  # iFSQ: 2 sigmoid(1.6 z) - 1 = tanh(0.8 z)
INT32_MAX_CODES = 2**31 - 1
MAX_MATERIALIZED_CODEBOOK = 2**24

__all__ = [
    "EPS",
    "VARIANTS",
    "basis",
    "bound",
    "channel_constants",
    "comparison_boundaries",
    "codebook_size",
    "codes_to_indices",
    "distance_to_rounding_boundary",
    "implicit_codebook",
    "index_dtype",
    "indices_to_codes",
    "indices_to_level_indices",
    "level_boundaries",
    "quantize",
]


# ---------------------------------------------------------------------------------------------
# Level-set constants (plain Python floats, computed in float64)
# ---------------------------------------------------------------------------------------------


def codebook_size(levels: Sequence[int]) -> int:
    return math.prod(levels)


def index_dtype(levels: Sequence[int]) -> torch.dtype:
    """int32 while every index fits, int64 beyond 2^31 - 1 codes."""
    return torch.int32 if codebook_size(levels) <= INT32_MAX_CODES else torch.int64


def basis(levels: Sequence[int]) -> list[int]:
    """Mixed-radix place values: cumprod([1, L_0, ..., L_{d-2}])."""
    out = [1]
    for level in levels[:-1]:
        out.append(out[-1] * level)
    return out


def channel_constants(levels: Sequence[int], variant: str = "paper", hard_clamp: bool = False) -> dict:
    """Per-channel constants of the bound: half_l, offset, shift, input_scale (float64) and
    half_width (int); b = tanh(input_scale * z + shift) * half_l - offset.

    For `symmetric` only half_width is meaningful; half_l/offset/shift are reported as
    (L-1)/2, 0, 0 so that b = tanh(z) * half_l + half_l + 1/2 there. input_scale is 0.8 for
    `ifsq` (odd L only: half_l = (L-1)/2, no offset, no shift) and 1 otherwise.
    """
    half_l, offset, shift = [], [], []
    for level in levels:
        if variant in ("symmetric", "ifsq"):
            h, o, s = (level - 1) / 2, 0.0, 0.0
        else:
            o = 0.5 if level % 2 == 0 else 0.0
            if variant == "paper":
                h = (level - 1) * (1 - EPS) / 2
                s = math.tan(o / h)  # tan, not atanh: the official code's quirk, kept for parity
            else:
                h = (level - 1) * (1 + EPS) / 2
                s = o / h if hard_clamp else math.atanh(o / h)
        half_l.append(h)
        offset.append(o)
        shift.append(s)
    return {
        "half_l": half_l,
        "offset": offset,
        "shift": shift,
        "input_scale": [IFSQ_INPUT_SCALE if variant == "ifsq" else 1.0] * len(levels),
        "half_width": [level // 2 for level in levels],
    }


def _atanh_or_inf(x: float) -> float:
    if x <= -1.0:
        return -math.inf
    if x >= 1.0:
        return math.inf
    return math.atanh(x)


def level_boundaries(levels: Sequence[int], variant: str = "paper", hard_clamp: bool = False) -> list[list[float]]:
    """For each channel, the L-1 values of z where the level index steps up (float64, ascending).

    paper/atanh/ifsq: k = #{q : z > t_q}; symmetric: k = #{j : z >= t_j} (its ties round up).
    t_q = (atanh((q + 1/2 + offset)/half_l) - shift) / input_scale (hard_clamp: without atanh).
    A boundary the bound cannot reach is -inf or +inf (`paper` with L >= 1002).
    """
    consts = channel_constants(levels, variant, hard_clamp)
    out = []
    for i, level in enumerate(levels):
        if variant == "symmetric":
            targets = [(2 * j + 1) / (level - 1) - 1 for j in range(level - 1)]
            out.append(targets if hard_clamp else [_atanh_or_inf(t) for t in targets])
            continue
        h, o, s, hw = consts["half_l"][i], consts["offset"][i], consts["shift"][i], consts["half_width"][i]
        a = consts["input_scale"][i]
        row = []
        for q in range(-hw, level - 1 - hw):
            target = (q + 0.5 + o) / h
            t = (target - s) if hard_clamp else _atanh_or_inf(target) - s
            row.append(t if a == 1.0 else t / a)
        out.append(row)
    return out


def comparison_boundaries(
    levels: Sequence[int], variant: str = "paper", hard_clamp: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[list[int], list[list[float]]]:
    """The boundaries the index comparisons use: (k0, finite) per channel, with
    k = k0 + #{t in finite : x > t} for paper/atanh and k = #{t in finite : x >= t} for symmetric.

    k0 counts the boundaries at -inf (always exceeded); +inf ones are left out (never reached).
    For dtype float32 each finite boundary is the real-valued one rounded to float32 in the
    direction its comparison needs (down for >, up for >=), decided in exact arithmetic, so that
    comparing any float32, bfloat16 or float16 x (converted to float32, exactly) with it is
    comparing x with the real boundary. For float64 the float64 values of level_boundaries are
    used as they are (exact up to their own rounding, a few 1e-16 relative).
    """
    levels = tuple(levels)
    rows = level_boundaries(levels, variant, hard_clamp)
    ties_up = variant == "symmetric"
    consts = channel_constants(levels, variant, hard_clamp)
    k0s, out = [], []
    for i, (level, row) in enumerate(zip(levels, rows)):
        k0s.append(sum(1 for t in row if t == -math.inf))
        finite = []
        for j, t in enumerate(row):
            if math.isinf(t):
                continue
            if dtype == torch.float64:
                finite.append(t)
                continue
            if variant == "symmetric":
                x, shift = (2 * j + 1) / (level - 1) - 1, 0.0
            else:
                x = (j - consts["half_width"][i] + 0.5 + consts["offset"][i]) / consts["half_l"][i]
                shift = consts["shift"][i]
            sign = functools.partial(_sign_of_boundary_minus, level=level, j=j, variant=variant,
                                     hard_clamp=hard_clamp, consts=consts, i=i)
            finite.append(_round_boundary_f32(t, x, shift, hard_clamp, ties_up, sign, consts["input_scale"][i]))
        out.append(finite)
    return k0s, out


# ---------------------------------------------------------------------------------------------
# Tensor math
# ---------------------------------------------------------------------------------------------


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def bound(z: Tensor, levels: Sequence[int], variant: str = "paper", hard_clamp: bool = False) -> Tensor:
    """The value that gets rounded, channel-last (..., d), in z's dtype (differentiable).

    paper/atanh: b = tanh(z + shift) * half_l - offset, rounded half-to-even.
    ifsq:        b = tanh(0.8 z) * (L-1)/2, rounded half-to-even (odd L).
    symmetric:   b = (L-1)(tanh(z) + 1)/2 + 1/2, floored.
    With hard_clamp, tanh is replaced by clamp(., -1, 1).
    """
    squash = (lambda x: x.clamp(-1.0, 1.0)) if hard_clamp else torch.tanh
    consts = channel_constants(levels, variant, hard_clamp)
    if variant == "symmetric":
        levels_minus_1 = _per_channel([level - 1 for level in levels], z)
        return levels_minus_1 * (squash(z) + 1) / 2 + 0.5
    half_l = _per_channel(consts["half_l"], z)
    offset = _per_channel(consts["offset"], z)
    shift = _per_channel(consts["shift"], z)
    if variant == "ifsq":
        z = z * _per_channel(consts["input_scale"], z)
    return squash(z + shift) * half_l - offset


def distance_to_rounding_boundary(
    z: Tensor, levels: Sequence[int], variant: str = "paper", hard_clamp: bool = False
) -> Tensor:
    """|b - nearest rounding boundary| for channel-last z, evaluated in float64.

    The boundaries are half-integers for paper/atanh and integers for symmetric. Backends
    computing in float32 may round the other way only where this is < 1e-5 * max(1, half_l).
    """
    b = bound(z.detach().to(torch.float64), levels, variant, hard_clamp)
    nearest = b.round() if variant == "symmetric" else b.floor() + 0.5
    return (b - nearest).abs()


def _level_index_to_code(k: Tensor, levels: Sequence[int], variant: str) -> Tensor:
    levels_t = _per_channel(levels, k)
    if variant == "symmetric":
        # 2k/(L-1) - 1 written with one rounding: the numerator is an exact integer.
        return (2 * k - (levels_t - 1)) / (levels_t - 1)
    half_width = _per_channel([level // 2 for level in levels], k)
    return (k - half_width) / half_width


def _level_indices_to_indices(k: Tensor, levels: Sequence[int], nan_token: Tensor) -> Tensor:
    """sum_i k_i * basis_i in int64 (never a float sum); -1 where a channel is NaN."""
    k = torch.where(nan_token.unsqueeze(-1), 0, k).to(torch.int64)
    place = torch.tensor(basis(levels), dtype=torch.int64, device=k.device)
    indices = (k * place).sum(dim=-1)
    indices = torch.where(nan_token, -1, indices)
    return indices.to(index_dtype(levels))


def _to_channel_last(x: Tensor, channel_first: bool) -> Tensor:
    return x.movedim(1, -1) if channel_first else x


def _from_channel_last(x: Tensor, channel_first: bool) -> Tensor:
    return x.movedim(-1, 1) if channel_first else x


@functools.cache
def _cached_comparison_boundaries(levels: tuple, variant: str, hard_clamp: bool, dtype: torch.dtype):
    k0, rows = comparison_boundaries(levels, variant, hard_clamp, dtype)
    width = max(1, max(len(row) for row in rows))
    padded = tuple(tuple(row) + (math.inf,) * (width - len(row)) for row in rows)
    return tuple(k0), tuple(len(row) for row in rows), padded


@torch.compiler.assume_constant_result
def traceable_comparison_boundaries(levels: tuple, variant: str, hard_clamp: bool, dtype: torch.dtype):
    """(k0, finite counts, +inf-padded rows) of comparison_boundaries, cached; torch.compile and
    export take the result as a constant (the Python that builds it is never traced)."""
    return _cached_comparison_boundaries(tuple(levels), variant, bool(hard_clamp), dtype)


def _level_indices(x: Tensor, levels: Sequence[int], variant: str, hard_clamp: bool) -> Tensor:
    """Level index k (x's dtype, NaN where x is NaN) of channel-last x in its math dtype, counted
    against the comparison boundaries: exact for every float32/bfloat16/float16 input."""
    k0, counts, padded = traceable_comparison_boundaries(tuple(levels), variant, hard_clamp, x.dtype)
    d = len(levels)
    bounds = torch.tensor(padded, dtype=x.dtype, device=x.device)  # (d, width), ascending rows
    flat = x.reshape(-1, d).transpose(0, 1).contiguous()
    k = torch.searchsorted(bounds, flat, right=variant == "symmetric")  # right: #{t <= x}
    counts_t = torch.tensor(counts, dtype=k.dtype, device=x.device).unsqueeze(-1)
    k = torch.minimum(k, counts_t) + torch.tensor(k0, dtype=k.dtype, device=x.device).unsqueeze(-1)
    k = k.transpose(0, 1).reshape(x.shape).to(x.dtype)
    return torch.where(torch.isnan(x), torch.full_like(x, math.nan), k)


def quantize(
    z: Tensor,
    levels: Sequence[int],
    *,
    variant: str = "paper",
    hard_clamp: bool = False,
    channel_first: bool = False,
    num_codebooks: int = 1,
    return_indices: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Codes (z's dtype, straight-through gradient) and indices, per docs/design.md."""
    levels = tuple(levels)
    d = len(levels)
    x = _to_channel_last(z, channel_first)
    x = x.to(_math_dtype(z.dtype)).unflatten(-1, (num_codebooks, d))
    b = bound(x, levels, variant, hard_clamp)
    levels_t = _per_channel(levels, b)
    k = _level_indices(x.detach(), levels, variant, hard_clamp)  # from the boundaries: exact
    if variant == "symmetric":
        code = (2 * (b + (k - b).detach()) - (levels_t - 1)) / (levels_t - 1)  # b + (k - b) == k exactly
    else:
        half_width = _per_channel([level // 2 for level in levels], b)
        q = k - half_width
        code = (b + (q - b).detach()) / half_width
    codes = _from_channel_last(code.flatten(-2), channel_first).to(z.dtype)
    if not return_indices:
        return codes, None
    nan_token = torch.isnan(k).any(dim=-1)
    indices = _level_indices_to_indices(k, levels, nan_token)
    if num_codebooks == 1:
        indices = indices.squeeze(-1)
    return codes, indices


def indices_to_level_indices(indices: Tensor, levels: Sequence[int]) -> Tensor:
    """Index (...) -> per-channel level index k (..., d), int64."""
    place = torch.tensor(basis(levels), dtype=torch.int64, device=indices.device)
    levels_t = torch.tensor(levels, dtype=torch.int64, device=indices.device)
    return (indices.to(torch.int64).unsqueeze(-1) // place) % levels_t


def indices_to_codes(
    indices: Tensor,
    levels: Sequence[int],
    *,
    variant: str = "paper",
    channel_first: bool = False,
    num_codebooks: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Decode without a materialized codebook: k_i = (index // basis_i) % L_i -> code."""
    if num_codebooks == 1:
        indices = indices.unsqueeze(-1)
    k = indices_to_level_indices(indices, levels).to(torch.float64)
    codes = _level_index_to_code(k, levels, variant).flatten(-2).to(dtype)
    return _from_channel_last(codes, channel_first)


def codes_to_indices(
    codes: Tensor,
    levels: Sequence[int],
    *,
    variant: str = "paper",
    channel_first: bool = False,
    num_codebooks: int = 1,
) -> Tensor:
    """Snap each code to the nearest grid point, then the integer index formula."""
    d = len(levels)
    x = _to_channel_last(codes, channel_first).to(torch.float64).unflatten(-1, (num_codebooks, d))
    levels_t = _per_channel(levels, x)
    if variant == "symmetric":
        k = (x + 1) * (levels_t - 1) / 2
    else:
        half_width = _per_channel([level // 2 for level in levels], x)
        k = x * half_width + half_width
    k = k.round().clamp(torch.zeros_like(levels_t), levels_t - 1)
    indices = _level_indices_to_indices(k, levels, torch.isnan(k).any(dim=-1))
    return indices.squeeze(-1) if num_codebooks == 1 else indices


def implicit_codebook(levels: Sequence[int], variant: str = "paper", dtype: torch.dtype = torch.float32) -> Tensor:
    """Every code, (prod(levels), d), row i the code of index i. Refuses more than 2^24 rows."""
    size = codebook_size(levels)
    if size > MAX_MATERIALIZED_CODEBOOK:
        raise ValueError(
            f"implicit_codebook: levels {list(levels)} give {size} codes, more than the "
            f"{MAX_MATERIALIZED_CODEBOOK} that may be materialized; decode indices with indices_to_codes instead"
        )
    return indices_to_codes(torch.arange(size), levels, variant=variant, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Residual FSQ (vector-quantize-pytorch's ResidualFSQ; stages quantize what earlier ones left)
# ---------------------------------------------------------------------------------------------


def residual_scales(levels: Sequence[int], num_stages: int) -> list[list[float]]:
    """Stage s quantizes residual / L^-s per channel. The values are the float32 numbers L^-s that
    vector-quantize-pytorch computes (float32 pow, equal to the float64 pow rounded to float32),
    so that checkpoints of the peer give its indices. Pure Python: traceable as constants."""
    return [[_f32(float(level) ** -stage) for level in levels] for stage in range(num_stages)]


def residual_soft_clamp(levels: Sequence[int]) -> list[float]:
    """The input soft clamp c = 1 + 1/(L-1) that pairs with hard-clamped stages (float32 values,
    computed as the peer does)."""
    levels_t = torch.tensor(levels)
    return (1 + 1 / (levels_t - 1)).tolist()


def residual_quantize(
    x: Tensor,
    levels: Sequence[int],
    num_stages: int,
    *,
    hard_clamp: bool = True,
    soft_clamp: Sequence[float] | None = None,
    channel_first: bool = False,
    active_stages: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual FSQ: (sum of every stage's scaled codes in x's dtype, indices (..., num_stages)).

    x is soft-clamped (tanh(x / c) * c) when soft_clamp is given; stage s quantizes
    residual / L^-s with the `symmetric` variant, and the residual drops what it took (detached).
    Stages from active_stages on are dropped (quantize dropout): no contribution, index -1.
    active_stages: None (all stages) or a 0-d integer tensor (an int is accepted too), compared
    as a tensor so that nothing syncs with the host and torch.compile/export can trace it.
    Channel-first input puts the stage axis of the indices at dim 1, as vector-quantize-pytorch.

    Precision: float32 rounding in the residual (about 1e-7 of |x|) reaches stage s multiplied by
    L^s (2e6 at L = 8, s = 7), so deep stages' indices are set by float32 noise in every float32
    implementation, the peer's included; tests widen the boundary window of stage s by L^s.
    """
    levels = tuple(levels)
    h = _to_channel_last(x, channel_first).to(_math_dtype(x.dtype))
    if active_stages is not None:
        # no dependence on x at all when every stage is dropped (as the fused kernels)
        h = torch.where(torch.as_tensor(active_stages, device=h.device) > 0, h, torch.zeros_like(h))
    if soft_clamp is not None:
        c = _per_channel(soft_clamp, h)
        h = torch.tanh(h / c) * c
    residual, out, all_indices = h, torch.zeros_like(h), []
    for stage, scale_values in enumerate(residual_scales(levels, num_stages)):
        scale = _per_channel(scale_values, h)
        codes, indices = quantize(residual / scale, levels, variant="symmetric", hard_clamp=hard_clamp)
        stage_out = codes * scale
        if active_stages is not None:  # quantize dropout, masked with tensors: no host sync
            kept = torch.as_tensor(active_stages, device=h.device) > stage
            stage_out = torch.where(kept, stage_out, torch.zeros_like(stage_out))
            indices = torch.where(kept, indices, torch.full_like(indices, -1))
        residual = residual - stage_out.detach()
        out = out + stage_out
        all_indices.append(indices)
    indices = torch.stack(all_indices, dim=-1)
    if channel_first:
        return out.movedim(-1, 1).to(x.dtype), indices.movedim(-1, 1)
    return out.to(x.dtype), indices
