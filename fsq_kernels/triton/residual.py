"""Triton kernels for fused residual FSQ (forward and one-pass backward) and their launchers.

The contract is ``fsq_kernels.reference.residual_quantize`` (docs/BACKENDS.md): every stage of a
token is computed in registers, so the forward reads x once and writes the quantized sum once and
each stage's index once; the backward reads x and grad_out once, recomputes the stages from x
(only x is saved) and writes grad_x:

    grad_x = grad_out * softclamp'(x) * sum over active stages s of bound'(y_s)

with bound'(y) = [-1 < y < 1] (hard_clamp) or 1 - tanh(y)^2: each stage's output is
code_s * scale_s with d code_s / d y_s = bound'(y_s) (straight-through across the round) and
d y_s / d x = softclamp'(x) / scale_s; the residual path is the identity because the subtracted
stage output is detached in the reference.

Everything layout- and level-related is shared with ``fsq.py`` (kept in one place, not copied):
the unit model (``_unit_offsets``, ``_z_units``, ``_collapse``, ``_pad_outer``, ``_flags``), the
level constants and float32-directed boundaries (``level_constants`` of the ``symmetric``
variant), the level-index computation (``_level_index``), tanh from exp2 and the bf16 output
rounding.  Here a unit is one token (num_codebooks = 1); the index tensor is described to the
unit model as a tensor whose "channels" are the stages, so channel-last indices ``(..., q)``
and channel-first indices ``(B, q, ...)`` are just two stage strides.

Float32 operation order follows the reference: h = tanh(x / c) * c; per stage y = residual /
scale (IEEE division, ``div_rn``), level index, code = (2k - (L-1)) / (L-1) with one rounding,
stage_out = code * scale, residual = residual - stage_out, out = out + stage_out.  The product
is formed as ``fma(code, scale, 0)`` so that the compiler cannot contract it into the following
subtraction/addition (an FMA would skip the product's rounding): with the same k the kernel
reproduces the reference's float32 residuals and sum bit for bit; only the soft clamp's tanh
(exp2-based, a few 1e-8 absolute) differs from torch.tanh.

Compile-time constants: levels (and their boundaries), num_stages, the stage scales (float32
L^-s values of ``reference.residual_scales``), the soft-clamp values, hard_clamp, dtype and
layout flags - all fixed for a given model.  ``active_stages`` (quantize dropout changes it every
step) is a runtime argument excluded from Triton's integer specialisation, so dropout never
recompiles.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference
from .fsq import (
    INT32_MAX,
    MAX_OUTER,
    _cast_out,
    _collapse,
    _f32_round,
    _flags,
    _identity,
    _lane_f32,
    _lane_int,
    _level_index,
    _one_minus_tanh_abs,
    _pad_outer,
    _span,
    _tanh,
    _unit_offsets,
    _z_units,
    level_constants,
)
from . import fsq as _fsq

SYMMETRIC = tl.constexpr(2)  # fsq.SYMMETRIC as a jit-visible constant
BLOCK_ELEMS = 1024  # rows x padded channels per program (smaller than FSQ's: more live values)

# --------------------------------------------------------------------------------------------
# Constants (host)
# --------------------------------------------------------------------------------------------

_CACHE: dict = {}


def residual_constants(levels, num_stages: int, hard_clamp: bool, soft_clamp) -> dict:
    """Constexpr payload: the symmetric level constants of ``fsq.level_constants`` plus SCALES
    (num_stages rows of float32 L^-s values, ``reference.residual_scales``) and SOFT (float32
    soft-clamp values, () without soft clamp)."""
    levels = tuple(int(v) for v in levels)
    soft = None if soft_clamp is None else tuple(float(c) for c in soft_clamp)
    key = (levels, int(num_stages), bool(hard_clamp), soft)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    out = dict(level_constants(levels, "symmetric", bool(hard_clamp)))
    out["SCALES"] = tuple(tuple(_f32_round(float(v), "nearest") for v in row)
                          for row in reference.residual_scales(levels, int(num_stages)))
    # the reference turns the soft-clamp values into a float32 tensor: round to nearest
    out["SOFT"] = () if soft is None else tuple(_f32_round(c, "nearest") for c in soft)
    _CACHE[key] = out
    return out


# --------------------------------------------------------------------------------------------
# Device helpers (shared by forward and backward, so both compute the same stages)
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(unit, lane_off, s_c, C_ONE: tl.constexpr):
    if C_ONE:
        return unit[:, None] + lane_off[None, :]
    else:
        return unit[:, None] + lane_off[None, :] * s_c


@triton.jit
def _soft_clamp(x, lane, SOFT: tl.constexpr, USE_SOFT: tl.constexpr, D: tl.constexpr,
                D_PAD: tl.constexpr):
    """h = tanh(x / c) * c (or x) and dh/dx = 1 - tanh(x / c)^2 (or 1)."""
    if USE_SOFT:
        c = _lane_f32(SOFT, lane, D, D_PAD, 1.0)[None, :]
        a = tl.div_rn(x, c)
        h = _tanh(a) * c
        u = _one_minus_tanh_abs(a)
        dh = u * (2.0 - u)
    else:
        h = x
        dh = tl.full(x.shape, 1.0, tl.float32)
    return h, dh


@triton.jit
def _stage(residual, scale, lane, lane_ok, L_i,
           LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
           BOUNDS: tl.constexpr, MAX_B: tl.constexpr, HARD_CLAMP: tl.constexpr,
           USE_CMP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """One symmetric stage: (y = residual / scale, level index k, stage output code * scale)."""
    y = tl.div_rn(residual, scale)
    k = _level_index(y, lane, L_i, LEVELS, HALF_L, OFFSET, SHIFT, BOUNDS, MAX_B,
                     SYMMETRIC, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK)
    L_max = (L_i - 1)[None, :]
    den = tl.where(lane_ok[None, :], L_max, 1)  # padding lanes: no 0/0
    code = tl.div_rn((2 * k - L_max).to(tl.float32), den.to(tl.float32))
    # fma(., ., +0) is the rounded product, and it cannot be contracted into the next add/sub
    stage_out = tl.fma(code, scale, 0.0)
    return y, k, stage_out


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["active_stages"])
def _residual_fwd_kernel(
    x_ptr, out_ptr, idx_ptr,
    active_stages,
    n_inner, n_o1, n_o2,
    xs_in, xs_o0, xs_o1, xs_o2, xs_c,
    os_in, os_o0, os_o1, os_o2, os_c,
    is_in, is_o0, is_o1, is_o2, is_c,
    LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
    BASIS: tl.constexpr, BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
    HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
    SCALES: tl.constexpr, SOFT: tl.constexpr, USE_SOFT: tl.constexpr,
    NUM_STAGES: tl.constexpr, S_PAD: tl.constexpr,
    X_IN_ONE: tl.constexpr, X_IN_CONST: tl.constexpr, X_C_ONE: tl.constexpr,
    O_IN_ONE: tl.constexpr, O_IN_CONST: tl.constexpr, O_C_ONE: tl.constexpr,
    I_IN_ONE: tl.constexpr, I_IN_CONST: tl.constexpr, I_C_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane
    stage = tl.arange(0, S_PAD)
    stage_off = stage.to(tl.int64) if I64 else stage

    x_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, xs_in, xs_o0, xs_o1, xs_o2,
                                   X_IN_ONE, X_IN_CONST, BLOCK, N_OUTER, I64)
    mask = row_ok[:, None] & lane_ok[None, :]
    x = tl.load(x_ptr + _tile_offsets(x_unit, lane_off, xs_c, X_C_ONE), mask=mask,
                other=0.0).to(tl.float32)  # the only read of x

    h, _ = _soft_clamp(x, lane, SOFT, USE_SOFT, D, D_PAD)
    is_nan = h != h
    any_nan = tl.max(tl.where(mask & is_nan, 1, 0), axis=1) > 0

    IDT: tl.constexpr = idx_ptr.dtype.element_ty
    L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
    basis = _lane_int(BASIS, lane, D, D_PAD, IDT)
    residual = h
    out = tl.zeros([BLOCK, D_PAD], tl.float32)
    indices = tl.full([BLOCK, S_PAD], -1, IDT)  # dropped stages keep -1
    for s in tl.static_range(NUM_STAGES):
        if s < active_stages:
            scale = _lane_f32(SCALES[s], lane, D, D_PAD, 1.0)[None, :]
            y, k, stage_out = _stage(residual, scale, lane, lane_ok, L_i, LEVELS, HALF_L, OFFSET,
                                     SHIFT, BOUNDS, MAX_B, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK)
            residual = residual - stage_out
            out = out + stage_out
            idx_s = tl.sum(tl.where(mask, k.to(IDT) * basis[None, :], 0), axis=1)
            idx_s = tl.where(any_nan, -1, idx_s)
            indices = tl.where(stage[None, :] == s, idx_s[:, None], indices)
    # NaN channels give NaN once a stage has run (code NaN in the reference); others stay finite
    out = tl.where(is_nan & (active_stages > 0), h, out)

    o_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, os_in, os_o0, os_o1, os_o2,
                              O_IN_ONE, O_IN_CONST, BLOCK, N_OUTER, I64)
    tl.store(out_ptr + _tile_offsets(o_unit, lane_off, os_c, O_C_ONE),
             _cast_out(out, out_ptr.dtype.element_ty), mask=mask)
    i_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, is_in, is_o0, is_o1, is_o2,
                              I_IN_ONE, I_IN_CONST, BLOCK, N_OUTER, I64)
    i_mask = row_ok[:, None] & (stage < NUM_STAGES)[None, :]
    tl.store(idx_ptr + _tile_offsets(i_unit, stage_off, is_c, I_C_ONE), indices, mask=i_mask)


@triton.jit(do_not_specialize=["active_stages"])
def _residual_bwd_kernel(
    x_ptr, g_ptr, gx_ptr,
    active_stages,
    n_inner, n_o1, n_o2,
    xs_in, xs_o0, xs_o1, xs_o2, xs_c,
    gs_in, gs_o0, gs_o1, gs_o2, gs_c,
    os_in, os_o0, os_o1, os_o2, os_c,
    LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
    BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
    HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
    SCALES: tl.constexpr, SOFT: tl.constexpr, USE_SOFT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    X_IN_ONE: tl.constexpr, X_IN_CONST: tl.constexpr, X_C_ONE: tl.constexpr,
    G_IN_ONE: tl.constexpr, G_IN_CONST: tl.constexpr, G_C_ONE: tl.constexpr,
    O_IN_ONE: tl.constexpr, O_IN_CONST: tl.constexpr, O_C_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane

    x_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, xs_in, xs_o0, xs_o1, xs_o2,
                                   X_IN_ONE, X_IN_CONST, BLOCK, N_OUTER, I64)
    g_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, gs_in, gs_o0, gs_o1, gs_o2,
                              G_IN_ONE, G_IN_CONST, BLOCK, N_OUTER, I64)
    mask = row_ok[:, None] & lane_ok[None, :]
    x = tl.load(x_ptr + _tile_offsets(x_unit, lane_off, xs_c, X_C_ONE), mask=mask,
                other=0.0).to(tl.float32)
    g = tl.load(g_ptr + _tile_offsets(g_unit, lane_off, gs_c, G_C_ONE), mask=mask,
                other=0.0).to(tl.float32)

    h, dh = _soft_clamp(x, lane, SOFT, USE_SOFT, D, D_PAD)
    L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
    residual = h
    count = tl.zeros([BLOCK, D_PAD], tl.float32)  # sum over active stages of bound'(y_s)
    for s in tl.static_range(NUM_STAGES):
        if s < active_stages:
            scale = _lane_f32(SCALES[s], lane, D, D_PAD, 1.0)[None, :]
            y, k, stage_out = _stage(residual, scale, lane, lane_ok, L_i, LEVELS, HALF_L, OFFSET,
                                     SHIFT, BOUNDS, MAX_B, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK)
            if HARD_CLAMP:
                count += tl.where((y > -1.0) & (y < 1.0), 1.0, 0.0)
            else:
                u = _one_minus_tanh_abs(y)
                count += u * (2.0 - u)  # 1 - tanh^2 = (1 - |t|)(1 + |t|)
            residual = residual - stage_out
    # As autograd of the reference: a NaN x gives NaN through the soft clamp or tanh stages and
    # 0 through hard-clamped stages alone (count stays 0); no active stage, no dependence on x.
    gx = tl.where(active_stages > 0, g * (dh * count), 0.0)

    o_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, os_in, os_o0, os_o1, os_o2,
                              O_IN_ONE, O_IN_CONST, BLOCK, N_OUTER, I64)
    tl.store(gx_ptr + _tile_offsets(o_unit, lane_off, os_c, O_C_ONE),
             _cast_out(gx, gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers (host only: shapes and strides, never tensor values -> no device sync)
# --------------------------------------------------------------------------------------------


def _block_for(d_pad: int, n_inner: int) -> int:
    block = max(16, BLOCK_ELEMS // d_pad)
    return min(block, max(16, triton.next_power_of_2(n_inner)))


def _geometry(x, others, channel_first: bool, d: int):
    """Unit geometry of x and the tensors in `others` ((tensor, channels) pairs, all with x's
    tokens): collapsed unit sizes and, per tensor, (padded unit strides, channel stride).
    None when more than MAX_OUTER + 1 unit dims remain (the caller copies and retries)."""
    sizes, xst, xsc = _z_units(x.shape, x.stride(), channel_first, 1, d)
    st, sc = [xst], [xsc]
    for t, ch in others:
        _, tst, tsc = _z_units(t.shape, t.stride(), channel_first, 1, ch)
        st.append(tst)
        sc.append(tsc)
    usz, st = _collapse(sizes, st)
    if len(usz) - 1 > MAX_OUTER:
        return None
    padded = [_pad_outer(usz, s) for s in st]
    n_inner, n_outer_sizes, _ = padded[0]
    chans = [d] + [ch for _, ch in others]
    i64 = _fsq._FORCE_I64 or x.numel() > INT32_MAX or any(
        _span(usz, s) + (ch - 1) * abs(c) > INT32_MAX for s, c, ch in zip(st, sc, chans))
    n_outer = len(usz) - 1
    n_programs_outer = math.prod(usz[:-1]) if n_outer else 1
    return usz, n_inner, n_outer_sizes, [p[2] for p in padded], sc, n_outer, i64, n_programs_outer


def _tok_shape(x, channel_first):
    return (x.shape[0],) + tuple(x.shape[2:]) if channel_first else tuple(x.shape[:-1])


def residual_forward(x: torch.Tensor, levels, num_stages: int, hard_clamp: bool, soft_clamp,
                     channel_first: bool, active_stages: int, wrap=_identity):
    """(out in x.dtype with x's shape, indices (..., q) or (B, q, ...)), one launch."""
    levels = tuple(int(v) for v in levels)
    q, d = int(num_stages), len(levels)
    cst = residual_constants(levels, q, hard_clamp, soft_clamp)
    idt = torch.int64 if cst["INDEX_64"] else torch.int32
    tok = _tok_shape(x, channel_first)
    idx_shape = (tok[0], q) + tok[1:] if channel_first else tok + (q,)
    out = torch.empty_like(x)
    idx = torch.empty(idx_shape, dtype=idt, device=x.device)
    if x.numel() == 0:
        return out, idx
    xx = x
    geo = _geometry(xx, [(out, d), (idx, q)], channel_first, d)
    if geo is None:  # > 4 non-collapsible unit dims: rare, documented fallback (as in fsq.py)
        xx = x.contiguous()
        out = torch.empty_like(xx)
        geo = _geometry(xx, [(out, d), (idx, q)], channel_first, d)
    usz, n_inner, (n_o1, n_o2), (xs, os_, is_), (xsc, osc, isc), n_outer, i64, n_prog = geo
    xf, of, idf = _flags(xs[0], xsc, d), _flags(os_[0], osc, d), _flags(is_[0], isc, q)
    d_pad = triton.next_power_of_2(d)
    block = _block_for(d_pad, n_inner)
    grid = (triton.cdiv(n_inner, block) * n_prog,)
    wrap(_residual_fwd_kernel)[grid](
        xx, out, idx,
        int(active_stages),
        n_inner, n_o1, n_o2,
        *xs, xsc, *os_, osc, *is_, isc,
        LEVELS=cst["LEVELS"], HALF_L=cst["HALF_L"], OFFSET=cst["OFFSET"], SHIFT=cst["SHIFT"],
        BASIS=cst["BASIS"], BOUNDS=cst["BOUNDS"], MAX_B=cst["MAX_B"],
        HARD_CLAMP=bool(hard_clamp), USE_CMP=cst["USE_CMP"],
        SCALES=cst["SCALES"], SOFT=cst["SOFT"], USE_SOFT=len(cst["SOFT"]) > 0,
        NUM_STAGES=q, S_PAD=triton.next_power_of_2(q),
        X_IN_ONE=xf[0], X_IN_CONST=xf[1], X_C_ONE=xf[2],
        O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
        I_IN_ONE=idf[0], I_IN_CONST=idf[1], I_C_ONE=idf[2],
        N_OUTER=n_outer, I64=i64, D=d, D_PAD=d_pad, BLOCK=block,
        num_warps=4,
    )
    return out, idx


def residual_backward(x: torch.Tensor, grad_out: torch.Tensor, levels, num_stages: int,
                      hard_clamp: bool, soft_clamp, channel_first: bool, active_stages: int,
                      wrap=_identity):
    """grad_x (x.dtype, x's shape) from x and grad_out in one pass (stages recomputed from x)."""
    levels = tuple(int(v) for v in levels)
    q, d = int(num_stages), len(levels)
    cst = residual_constants(levels, q, hard_clamp, soft_clamp)
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    xx, gg = x, grad_out
    geo = _geometry(xx, [(gg, d), (grad_x, d)], channel_first, d)
    if geo is None:
        xx, gg = x.contiguous(), grad_out.contiguous()
        grad_x = torch.empty_like(xx)
        geo = _geometry(xx, [(gg, d), (grad_x, d)], channel_first, d)
    usz, n_inner, (n_o1, n_o2), (xs, gs, os_), (xsc, gsc, osc), n_outer, i64, n_prog = geo
    xf, gf, of = _flags(xs[0], xsc, d), _flags(gs[0], gsc, d), _flags(os_[0], osc, d)
    d_pad = triton.next_power_of_2(d)
    block = _block_for(d_pad, n_inner)
    grid = (triton.cdiv(n_inner, block) * n_prog,)
    wrap(_residual_bwd_kernel)[grid](
        xx, gg, grad_x,
        int(active_stages),
        n_inner, n_o1, n_o2,
        *xs, xsc, *gs, gsc, *os_, osc,
        LEVELS=cst["LEVELS"], HALF_L=cst["HALF_L"], OFFSET=cst["OFFSET"], SHIFT=cst["SHIFT"],
        BOUNDS=cst["BOUNDS"], MAX_B=cst["MAX_B"],
        HARD_CLAMP=bool(hard_clamp), USE_CMP=cst["USE_CMP"],
        SCALES=cst["SCALES"], SOFT=cst["SOFT"], USE_SOFT=len(cst["SOFT"]) > 0,
        NUM_STAGES=q,
        X_IN_ONE=xf[0], X_IN_CONST=xf[1], X_C_ONE=xf[2],
        G_IN_ONE=gf[0], G_IN_CONST=gf[1], G_C_ONE=gf[2],
        O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
        N_OUTER=n_outer, I64=i64, D=d, D_PAD=d_pad, BLOCK=block,
        num_warps=4,
    )
    return grad_x
