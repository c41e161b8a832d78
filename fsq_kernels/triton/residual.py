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
the unit model and launch geometry (``_unit_offsets``, ``plan``), the level-index computation
(``_level_index``), tanh from exp2 and the bf16 output rounding. The constexprs (the symmetric
level constants and boundaries, the stage scales, the soft-clamp values) come from the op's
table (fsq_kernels/ops/tables.py) through the op layer.  Here a unit is one token (num_codebooks = 1); the index tensor is described to the
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
step) is a 0-d integer tensor the kernel loads (clamped to [0, num_stages]): no host sync, and a
new value never recompiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import shapes
from .common import (
    _cast_out,
    _identity,
    _lane_f32,
    _lane_int,
    _level_index,
    _load_f32,
    _one_minus_tanh_abs,
    _tanh,
    _unit_offsets,
    index_units,
    on_device,
    plan,
    z_units,
)

SYMMETRIC = tl.constexpr(2)  # fsq.SYMMETRIC as a jit-visible constant
BLOCK_ELEMS = 1024  # rows x padded channels per program (smaller than FSQ's: more live values)

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
def _stage(residual, keep, SCALES: tl.constexpr, s: tl.constexpr, lane, lane_ok, L_i,
           LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
           BOUNDS: tl.constexpr, MAX_B: tl.constexpr, HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
           D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, IN_SCALE: tl.constexpr):
    """Stage s of one tile: (y = residual / scale, level index k, stage output code * scale, 0
    where the stage is dropped). Shared by the forward and the backward (which recomputes it)."""
    scale = _stage_scale(SCALES, s, lane, D, D_PAD)[None, :]
    y = tl.div_rn(residual, scale)
    k = _level_index(y, lane, L_i, LEVELS, HALF_L, OFFSET, SHIFT, BOUNDS, MAX_B,
                     SYMMETRIC, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK, IN_SCALE)
    L_max = (L_i - 1)[None, :]
    den = tl.where(lane_ok[None, :], L_max, 1)  # padding lanes: no 0/0
    code = tl.div_rn((2 * k - L_max).to(tl.float32), den.to(tl.float32))
    # fma(., ., +0) is the rounded product, and it cannot be contracted into the next add/sub
    return y, k, tl.where(keep, tl.fma(code, scale, 0.0), 0.0)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _active_stages(active_ptr, HAS_ACTIVE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The number of active stages: loaded from the 0-d tensor, clamped to [0, NUM_STAGES]."""
    if HAS_ACTIVE:
        a = tl.load(active_ptr).to(tl.int32)
        return tl.minimum(tl.maximum(a, 0), NUM_STAGES)
    else:
        return NUM_STAGES


@triton.jit
def _stage_scale(SCALES: tl.constexpr, s: tl.constexpr, lane, D: tl.constexpr, D_PAD: tl.constexpr):
    """Stage s's per-channel scales ([D_PAD], 1 in padding lanes). Indexed here rather than by
    passing the row SCALES[s] to _lane_f32: triton 3.6 does not pass a row of a nested constexpr
    tuple on as a constexpr."""
    v = tl.full([D_PAD], 1.0, tl.float32)
    for i in tl.static_range(D):
        v = tl.where(lane == i, SCALES[s][i], v)
    return v


@triton.jit
def _residual_fwd_kernel(
    x_ptr, out_ptr, idx_ptr,
    active_ptr,
    n_inner, n_o1, n_o2,
    xs_in, xs_o0, xs_o1, xs_o2, xs_c,
    os_in, os_o0, os_o1, os_o2, os_c,
    is_in, is_o0, is_o1, is_o2, is_c,
    LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
    IN_SCALE: tl.constexpr,
    BASIS: tl.constexpr, BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
    HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
    SCALES: tl.constexpr, SOFT: tl.constexpr, USE_SOFT: tl.constexpr,
    NUM_STAGES: tl.constexpr, S_PAD: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    X_IN_ONE: tl.constexpr, X_IN_CONST: tl.constexpr, X_C_ONE: tl.constexpr,
    O_IN_ONE: tl.constexpr, O_IN_CONST: tl.constexpr, O_C_ONE: tl.constexpr,
    I_IN_ONE: tl.constexpr, I_IN_CONST: tl.constexpr, I_C_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    active_stages = _active_stages(active_ptr, HAS_ACTIVE, NUM_STAGES)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane
    stage = tl.arange(0, S_PAD)
    stage_off = stage.to(tl.int64) if I64 else stage

    x_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, xs_in, xs_o0, xs_o1, xs_o2,
                                   X_IN_ONE, X_IN_CONST, BLOCK, N_OUTER, I64)
    mask = row_ok[:, None] & lane_ok[None, :]
    x = _load_f32(x_ptr + _tile_offsets(x_unit, lane_off, xs_c, X_C_ONE), mask)  # the only read of x

    h, _ = _soft_clamp(x, lane, SOFT, USE_SOFT, D, D_PAD)
    is_nan = h != h
    any_nan = tl.max(tl.where(mask & is_nan, 1, 0), axis=1) > 0

    IDT: tl.constexpr = idx_ptr.dtype.element_ty
    L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
    basis = _lane_int(BASIS, lane, D, D_PAD, IDT)
    residual = h
    out = tl.zeros([BLOCK, D_PAD], tl.float32)
    indices = tl.full([BLOCK, S_PAD], -1, IDT)  # dropped stages keep -1
    # Every stage is computed and a dropped one masked out (branch-free; the dropped stages cost
    # their arithmetic, in training only). Without quantize dropout `keep` is a compile-time True
    # and the masks fold away.
    for s in tl.static_range(NUM_STAGES):
        keep = s < active_stages
        y, k, stage_out = _stage(residual, keep, SCALES, s, lane, lane_ok, L_i, LEVELS, HALF_L, OFFSET, SHIFT,
                                 BOUNDS, MAX_B, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK, IN_SCALE)
        residual = residual - stage_out
        out = out + stage_out
        idx_s = tl.sum(tl.where(mask, k.to(IDT) * basis[None, :], 0), axis=1)
        idx_s = tl.where(any_nan, -1, idx_s)
        indices = tl.where((stage[None, :] == s) & keep, idx_s[:, None], indices)
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


@triton.jit
def _residual_bwd_kernel(
    x_ptr, g_ptr, gx_ptr,
    active_ptr,
    n_inner, n_o1, n_o2,
    xs_in, xs_o0, xs_o1, xs_o2, xs_c,
    gs_in, gs_o0, gs_o1, gs_o2, gs_c,
    os_in, os_o0, os_o1, os_o2, os_c,
    LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
    IN_SCALE: tl.constexpr,
    BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
    HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
    SCALES: tl.constexpr, SOFT: tl.constexpr, USE_SOFT: tl.constexpr,
    NUM_STAGES: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    X_IN_ONE: tl.constexpr, X_IN_CONST: tl.constexpr, X_C_ONE: tl.constexpr,
    G_IN_ONE: tl.constexpr, G_IN_CONST: tl.constexpr, G_C_ONE: tl.constexpr,
    O_IN_ONE: tl.constexpr, O_IN_CONST: tl.constexpr, O_C_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    active_stages = _active_stages(active_ptr, HAS_ACTIVE, NUM_STAGES)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane

    x_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, xs_in, xs_o0, xs_o1, xs_o2,
                                   X_IN_ONE, X_IN_CONST, BLOCK, N_OUTER, I64)
    g_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, gs_in, gs_o0, gs_o1, gs_o2,
                              G_IN_ONE, G_IN_CONST, BLOCK, N_OUTER, I64)
    mask = row_ok[:, None] & lane_ok[None, :]
    x = _load_f32(x_ptr + _tile_offsets(x_unit, lane_off, xs_c, X_C_ONE), mask)
    g = _load_f32(g_ptr + _tile_offsets(g_unit, lane_off, gs_c, G_C_ONE), mask)

    h, dh = _soft_clamp(x, lane, SOFT, USE_SOFT, D, D_PAD)
    L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
    residual = h
    count = tl.zeros([BLOCK, D_PAD], tl.float32)  # sum over active stages of bound'(y_s)
    for s in tl.static_range(NUM_STAGES):  # dropped stages masked, as in the forward
        keep = s < active_stages
        y, k, stage_out = _stage(residual, keep, SCALES, s, lane, lane_ok, L_i, LEVELS, HALF_L, OFFSET, SHIFT,
                                 BOUNDS, MAX_B, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK, IN_SCALE)
        if HARD_CLAMP:
            bound_grad = tl.where((y > -1.0) & (y < 1.0), 1.0, 0.0)
        else:
            u = _one_minus_tanh_abs(y)
            bound_grad = u * (2.0 - u)  # 1 - tanh^2 = (1 - |t|)(1 + |t|)
        count += tl.where(keep, bound_grad, 0.0)
        residual = residual - stage_out
    # As autograd of the reference: a NaN x gives NaN through the soft clamp or tanh stages and
    # 0 through hard-clamped stages alone (count stays 0); no active stage, no dependence on x.
    gx = tl.where(active_stages > 0, g * (dh * count), 0.0)

    o_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, os_in, os_o0, os_o1, os_o2,
                              O_IN_ONE, O_IN_CONST, BLOCK, N_OUTER, I64)
    tl.store(gx_ptr + _tile_offsets(o_unit, lane_off, os_c, O_C_ONE),
             _cast_out(gx, gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers (host only: shapes and strides, never tensor values -> no device sync).
# `cst`: the constexpr payload (symmetric level set, SCALES, SOFT) of fsq_kernels/ops/triton.py.
# --------------------------------------------------------------------------------------------


def _constexprs(cst: dict, hard_clamp: bool, active_stages) -> dict:
    return dict(
        LEVELS=cst["LEVELS"], HALF_L=cst["HALF_L"], OFFSET=cst["OFFSET"], SHIFT=cst["SHIFT"],
        IN_SCALE=cst["IN_SCALE"],
        BOUNDS=cst["BOUNDS"], MAX_B=cst["MAX_B"], HARD_CLAMP=bool(hard_clamp), USE_CMP=cst["USE_CMP"],
        SCALES=cst["SCALES"], SOFT=cst["SOFT"], USE_SOFT=len(cst["SOFT"]) > 0,
        NUM_STAGES=len(cst["SCALES"]), HAS_ACTIVE=active_stages is not None,
    )


def residual_forward(x: torch.Tensor, cst: dict, hard_clamp: bool, channel_first: bool,
                     active_stages, wrap=_identity):
    """(out in x.dtype with x's shape, indices (..., q) or (B, q, ...)), one launch."""
    levels = cst["LEVELS"]
    q, d = len(cst["SCALES"]), len(levels)
    out = torch.empty_like(x)
    idx = torch.empty(shapes.residual_index_shape(x.shape, channel_first, q),
                      dtype=shapes.index_dtype(levels), device=x.device)
    if x.numel() == 0:
        return out, idx

    def make(copy):
        xx = x.contiguous() if copy else x
        oo = torch.empty_like(xx) if copy else out
        xu = z_units(xx, channel_first, 1, d)
        iu = index_units(idx, channel_first, 1, q, 1 if channel_first else idx.dim() - 1)
        return xu[0], [xu, z_units(oo, channel_first, 1, d), iu], xx.numel(), (xx, oo)

    geo, (xx, out) = plan(make, d, BLOCK_ELEMS)
    xf, of, idf = geo.flags
    with on_device(xx):  # the tensor's device, not the current one
        wrap(_residual_fwd_kernel)[geo.grid](
            xx, out, idx,
            xx if active_stages is None else active_stages,
            geo.n_inner, geo.n_o1, geo.n_o2,
            *geo.operand(0), *geo.operand(1), *geo.operand(2),
            BASIS=cst["BASIS"], S_PAD=triton.next_power_of_2(q),
            X_IN_ONE=xf[0], X_IN_CONST=xf[1], X_C_ONE=xf[2],
            O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
            I_IN_ONE=idf[0], I_IN_CONST=idf[1], I_C_ONE=idf[2],
            D=d, **_constexprs(cst, hard_clamp, active_stages), **geo.common(), num_warps=4,
        )
    return out, idx


def residual_backward(grad_out: torch.Tensor, x: torch.Tensor, cst: dict, hard_clamp: bool,
                      channel_first: bool, active_stages, wrap=_identity):
    """grad_x (x.dtype, x's shape) from grad_out and x in one pass (stages recomputed from x)."""
    d = len(cst["LEVELS"])
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    grad_out = grad_out.to(x.dtype)

    def make(copy):
        xx, gg = (x.contiguous(), grad_out.contiguous()) if copy else (x, grad_out)
        oo = torch.empty_like(xx) if copy else grad_x
        ops = [z_units(t, channel_first, 1, d) for t in (xx, gg, oo)]
        return ops[0][0], ops, xx.numel(), (xx, gg, oo)

    geo, (xx, gg, grad_x) = plan(make, d, BLOCK_ELEMS)
    xf, gf, of = geo.flags
    with on_device(xx):  # the tensor's device, not the current one
        wrap(_residual_bwd_kernel)[geo.grid](
            xx, gg, grad_x,
            xx if active_stages is None else active_stages,
            geo.n_inner, geo.n_o1, geo.n_o2,
            *geo.operand(0), *geo.operand(1), *geo.operand(2),
            X_IN_ONE=xf[0], X_IN_CONST=xf[1], X_C_ONE=xf[2],
            G_IN_ONE=gf[0], G_IN_CONST=gf[1], G_C_ONE=gf[2],
            O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
            D=d, **_constexprs(cst, hard_clamp, active_stages), **geo.common(), num_warps=4,
        )
    return grad_x
