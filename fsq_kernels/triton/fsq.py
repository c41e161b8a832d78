"""Triton kernels for FSQ (forward, backward, decode) and their launchers.

Nothing here knows about autograd or torch.library: the op layer
(``fsq_kernels/ops/triton.py``) registers the ops and passes ``wrap_triton`` as the ``wrap``
argument of the launchers, so the same launchers run eagerly, under ``torch.compile`` and
under ``TRITON_INTERPRET=1`` (CPU tensors).

Design (see docs/design.md for the math contract):

* Work unit = one (token, codebook) pair: the ``d`` channels of one codebook of one token.
  A program handles a tile ``[BLOCK, D_PAD]`` of units x channels.  The codebook axis is just
  another "unit" dimension whose stride is ``d * channel_stride``, so several codebooks,
  channel-last ``(..., C)`` and channel-first ``(B, C, ...)`` inputs all reduce to the same
  description: up to four unit dimensions (one blocked "inner" dimension plus up to three
  "outer" ones decoded from the program id) and one channel stride, per tensor.  No permute,
  no contiguous copy (only layouts that need more than four non-collapsible unit dimensions
  fall back to a copy).
* Level sets are ``tl.constexpr`` tuples: the per-channel constants and the level boundaries
  become immediates in the code, so there is no constant tensor, no host-to-device copy and
  no gather in the kernel.  The numbers are the op's table (fsq_kernels/ops/tables.py), turned
  into constexprs by the op layer (``fsq_kernels/ops/triton.py``, ``payload``); nothing here
  derives a constant.  The price is one compilation per level set (x variant, dtype, layout),
  which a training job pays once.
* Forward: for level counts up to ``CMP_MAX_LEVELS`` the level index is the number of
  boundaries below z (``z > t``, or ``z >= t`` for symmetric) against the float32 boundaries
  of the table, rounded in the direction of the comparison: exact for every float32,
  bfloat16 and float16 input.  For larger level counts the comparison chain would cost more
  than the memory traffic, so the kernel evaluates the bound (tanh from exp2) and rounds
  half-to-even in float32 instead: that path is not exact near a boundary (README, "How exact
  is exact?").
* All math in float32 registers; codes are stored in the input dtype (bfloat16 rounded to
  nearest even by integer ops, see ``_cast_out``); indices int32 or int64 (-1 for a codebook
  with a NaN channel).  Backward reads z and grad_codes once and writes grad_z; decode reads
  one index per (token, codebook) and writes its d codes, with no codebook in memory.
* Launchers read shapes and strides only (never tensor values): no host-device sync.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .. import shapes

# Variants as kernel constexprs.
PAPER, ATANH, SYMMETRIC, IFSQ = 0, 1, 2, 3
VARIANTS = {"paper": PAPER, "atanh": ATANH, "symmetric": SYMMETRIC, "ifsq": IFSQ}

CMP_MAX_LEVELS = 32  # comparison path when max(levels) <= this, tanh path above
MAX_OUTER = 3  # outer unit dimensions handled in-kernel (plus one blocked inner dimension)
INT32_MAX = 2**31 - 1

_TWO_LOG2E = tl.constexpr(2.0 * 1.4426950408889634)  # tanh via exp2: e^(2x) = 2^(2x*log2(e))

# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _one_minus_tanh_abs(x):
    """u = 1 - |tanh(x)| = 2 / (exp(2|x|) + 1), accurate for large |x| (no cancellation)."""
    e = tl.exp2(tl.abs(x) * _TWO_LOG2E)
    return 2.0 / (e + 1.0)


@triton.jit
def _tanh(x):
    # tl.math has no tanh and the interpreter has no libdevice: build it from exp2.
    t = 1.0 - _one_minus_tanh_abs(x)
    return tl.where(x < 0, -t, t)


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    tie = (r - x) == 0.5
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _cast_out(x, DTYPE: tl.constexpr):
    """float32 -> output dtype, round to nearest even.  For bfloat16 the rounding is spelled out
    in integer ops: the interpreter's float32 -> bfloat16 cast truncates, and this way the GPU
    runs exactly the code the CPU tests run (a few integer ops on a memory-bound kernel)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        hi = tl.where(x != x, 0x7FC0, rounded >> 16).to(tl.uint16)
        return hi.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _load_f32(ptrs, mask):
    """Load and widen to float32.  bfloat16 is widened by integer ops (its bits << 16): exact for
    subnormals, which the interpreter's bfloat16 conversion flushes to zero, and the same code
    (one shift, as the hardware conversion) on the GPU."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptrs.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _lane_f32(VALS: tl.constexpr, lane, D: tl.constexpr, D_PAD: tl.constexpr, DEFAULT: tl.constexpr):
    v = tl.full([D_PAD], DEFAULT, tl.float32)
    for i in tl.static_range(D):
        v = tl.where(lane == i, VALS[i], v)
    return v


@triton.jit
def _lane_int(VALS: tl.constexpr, lane, D: tl.constexpr, D_PAD: tl.constexpr, DTYPE: tl.constexpr):
    v = tl.zeros([D_PAD], DTYPE)
    for i in tl.static_range(D):
        v = tl.where(lane == i, tl.full([D_PAD], VALS[i], DTYPE), v)
    return v


@triton.jit
def _level_index(z, lane, L_i, LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr,
                 SHIFT: tl.constexpr, BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
                 VARIANT: tl.constexpr, HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
                 D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, IN_SCALE: tl.constexpr):
    """Level index k in [0, L-1] ([BLOCK, D_PAD] int32) of float32 z; NaN gives 0 (callers
    mark NaN themselves).  Shared by the FSQ forward and the residual kernels. IN_SCALE: the
    table's input_scale (ifsq's tanh path: tanh(0.8 z))."""
    L_max = (L_i - 1)[None, :]
    if USE_CMP:
        # level index = number of boundaries below z (ties go up for symmetric)
        k = tl.zeros([BLOCK, D_PAD], tl.int32)
        for q in tl.static_range(MAX_B):
            thr = tl.full([D_PAD], float("inf"), tl.float32)  # lanes without a q-th boundary
            for i in tl.static_range(D):
                if q < LEVELS[i] - 1:
                    thr = tl.where(lane == i, BOUNDS[i][q], thr)
            if VARIANT == 2:
                k += (z >= thr[None, :]).to(tl.int32)
            else:
                k += (z > thr[None, :]).to(tl.int32)
    else:
        shift = _lane_f32(SHIFT, lane, D, D_PAD, 0.0)[None, :]
        if VARIANT == 3:
            x = z * _lane_f32(IN_SCALE, lane, D, D_PAD, 1.0)[None, :] + shift
        else:
            x = z + shift
        if HARD_CLAMP:
            t = tl.minimum(tl.maximum(x, -1.0), 1.0)
        else:
            t = _tanh(x)
        if VARIANT == 2:
            kf = tl.floor((L_max.to(tl.float32) * (t + 1.0)) * 0.5 + 0.5)
        else:
            half_l = _lane_f32(HALF_L, lane, D, D_PAD, 1.0)[None, :]
            offset = _lane_f32(OFFSET, lane, D, D_PAD, 0.0)[None, :]
            hw_f = (L_i // 2).to(tl.float32)[None, :]
            kf = _round_half_even(t * half_l - offset) + hw_f
        kf = tl.where(z != z, 0.0, kf)
        k = kf.to(tl.int32)
    return tl.minimum(tl.maximum(k, 0), L_max)


@triton.jit
def _unit_offsets(pid, n_inner, n_o1, n_o2, s_in, s_o0, s_o1, s_o2,
                  IN_ONE: tl.constexpr, IN_CONST: tl.constexpr, BLOCK: tl.constexpr,
                  N_OUTER: tl.constexpr, I64: tl.constexpr):
    """Element offset of the first channel of each unit of this program's tile ([BLOCK]).

    The program id is (outer index, inner block) with the inner block fastest; outer dims
    o0 (slowest) .. o2 (fastest).  IN_ONE / IN_CONST replace the inner stride by the constant
    1 / IN_CONST so that the compiler sees contiguity and alignment (vector accesses)."""
    n_blk = tl.cdiv(n_inner, BLOCK)
    blk = pid % n_blk
    o = pid // n_blk
    if I64:
        o = o.to(tl.int64)
        inner = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        inner = blk * BLOCK + tl.arange(0, BLOCK)
    inner_i = inner
    if IN_ONE:
        off = inner_i
    elif IN_CONST > 0:
        off = inner_i * IN_CONST
    else:
        off = inner_i * s_in
    base = o * 0
    if N_OUTER == 1:
        base = o * s_o0
    elif N_OUTER == 2:
        base = (o % n_o1) * s_o1 + (o // n_o1) * s_o0
    elif N_OUTER == 3:
        base = (o % n_o2) * s_o2 + ((o // n_o2) % n_o1) * s_o1 + (o // (n_o2 * n_o1)) * s_o0
    return off + base, inner < n_inner


@triton.jit
def _fsq_fwd_kernel(
    z_ptr, codes_ptr, idx_ptr,
    n_inner, n_o1, n_o2,
    zs_in, zs_o0, zs_o1, zs_o2, zs_c,
    cs_in, cs_o0, cs_o1, cs_o2, cs_c,
    is_in, is_o0, is_o1, is_o2,
    LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
    IN_SCALE: tl.constexpr,
    BASIS: tl.constexpr, BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
    VARIANT: tl.constexpr, HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
    WRITE_INDEX: tl.constexpr, INDEX_64: tl.constexpr,
    Z_IN_ONE: tl.constexpr, Z_IN_CONST: tl.constexpr, Z_C_ONE: tl.constexpr,
    C_IN_ONE: tl.constexpr, C_IN_CONST: tl.constexpr, C_C_ONE: tl.constexpr,
    I_IN_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane  # channel offsets may pass 2^31

    z_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, zs_in, zs_o0, zs_o1, zs_o2,
                                   Z_IN_ONE, Z_IN_CONST, BLOCK, N_OUTER, I64)
    if Z_C_ONE:
        z_off = z_unit[:, None] + lane_off[None, :]
    else:
        z_off = z_unit[:, None] + lane_off[None, :] * zs_c
    mask = row_ok[:, None] & lane_ok[None, :]
    z = _load_f32(z_ptr + z_off, mask)  # the only read of z

    L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
    L_max = (L_i - 1)[None, :]
    k = _level_index(z, lane, L_i, LEVELS, HALF_L, OFFSET, SHIFT, BOUNDS, MAX_B,
                     VARIANT, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK, IN_SCALE)

    if VARIANT == 2:
        num = 2 * k - L_max
        den = L_max
    else:
        hw = (L_i // 2)[None, :]
        num = k - hw
        den = hw
    den = tl.where(lane_ok[None, :], den, 1)  # padding lanes: no 0/0
    code = tl.div_rn(num.to(tl.float32), den.to(tl.float32))
    is_nan = z != z
    code = tl.where(is_nan, z, code)

    c_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, cs_in, cs_o0, cs_o1, cs_o2,
                              C_IN_ONE, C_IN_CONST, BLOCK, N_OUTER, I64)
    if C_C_ONE:
        c_off = c_unit[:, None] + lane_off[None, :]
    else:
        c_off = c_unit[:, None] + lane_off[None, :] * cs_c
    tl.store(codes_ptr + c_off, _cast_out(code, codes_ptr.dtype.element_ty), mask=mask)

    if WRITE_INDEX:
        IDT: tl.constexpr = idx_ptr.dtype.element_ty
        basis = _lane_int(BASIS, lane, D, D_PAD, IDT)
        contrib = tl.where(mask, k.to(IDT) * basis[None, :], 0)
        idx = tl.sum(contrib, axis=1)
        any_nan = tl.max(tl.where(mask & is_nan, 1, 0), axis=1) > 0
        idx = tl.where(any_nan, -1, idx)
        i_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, is_in, is_o0, is_o1, is_o2,
                                  I_IN_ONE, 0, BLOCK, N_OUTER, I64)
        tl.store(idx_ptr + i_unit, idx.to(IDT), mask=row_ok)


@triton.jit
def _fsq_bwd_kernel(
    z_ptr, g_ptr, gz_ptr,
    n_inner, n_o1, n_o2,
    zs_in, zs_o0, zs_o1, zs_o2, zs_c,
    gs_in, gs_o0, gs_o1, gs_o2, gs_c,
    os_in, os_o0, os_o1, os_o2, os_c,
    SHIFT: tl.constexpr, GRAD_SCALE: tl.constexpr, IN_SCALE: tl.constexpr,
    VARIANT: tl.constexpr, HARD_CLAMP: tl.constexpr,
    Z_IN_ONE: tl.constexpr, Z_IN_CONST: tl.constexpr, Z_C_ONE: tl.constexpr,
    G_IN_ONE: tl.constexpr, G_IN_CONST: tl.constexpr, G_C_ONE: tl.constexpr,
    O_IN_ONE: tl.constexpr, O_IN_CONST: tl.constexpr, O_C_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane  # channel offsets may pass 2^31

    z_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, zs_in, zs_o0, zs_o1, zs_o2,
                                   Z_IN_ONE, Z_IN_CONST, BLOCK, N_OUTER, I64)
    g_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, gs_in, gs_o0, gs_o1, gs_o2,
                              G_IN_ONE, G_IN_CONST, BLOCK, N_OUTER, I64)
    o_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, os_in, os_o0, os_o1, os_o2,
                              O_IN_ONE, O_IN_CONST, BLOCK, N_OUTER, I64)
    mask = row_ok[:, None] & lane_ok[None, :]
    if Z_C_ONE:
        z_off = z_unit[:, None] + lane_off[None, :]
    else:
        z_off = z_unit[:, None] + lane_off[None, :] * zs_c
    if G_C_ONE:
        g_off = g_unit[:, None] + lane_off[None, :]
    else:
        g_off = g_unit[:, None] + lane_off[None, :] * gs_c
    if O_C_ONE:
        o_off = o_unit[:, None] + lane_off[None, :]
    else:
        o_off = o_unit[:, None] + lane_off[None, :] * os_c
    z = _load_f32(z_ptr + z_off, mask)
    g = _load_f32(g_ptr + g_off, mask)

    if VARIANT == 2:
        x = z
    else:
        x = z + _lane_f32(SHIFT, lane, D, D_PAD, 0.0)[None, :]
        if VARIANT == 3:  # ifsq: sech^2(0.8 z), shift 0
            x = z * _lane_f32(IN_SCALE, lane, D, D_PAD, 1.0)[None, :]
    if HARD_CLAMP:
        d = tl.where((x > -1.0) & (x < 1.0), 1.0, 0.0)  # NaN: 0, as autograd of the clamp
    else:
        u = _one_minus_tanh_abs(x)
        d = u * (2.0 - u)  # 1 - tanh^2 = (1 - |t|)(1 + |t|)
    if VARIANT != 2:
        d = d * _lane_f32(GRAD_SCALE, lane, D, D_PAD, 0.0)[None, :]
    gz = g * d
    tl.store(gz_ptr + o_off, _cast_out(gz, gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fsq_decode_kernel(
    idx_ptr, out_ptr,
    n_inner, n_o1, n_o2,
    is_in, is_o0, is_o1, is_o2,
    os_in, os_o0, os_o1, os_o2, os_c,
    LEVELS: tl.constexpr, BASIS: tl.constexpr, NUM_CODES: tl.constexpr,
    VARIANT: tl.constexpr, DIV_64: tl.constexpr,
    I_IN_ONE: tl.constexpr,
    O_IN_ONE: tl.constexpr, O_IN_CONST: tl.constexpr, O_C_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane  # channel offsets may pass 2^31
    i_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, is_in, is_o0, is_o1, is_o2,
                                   I_IN_ONE, 0, BLOCK, N_OUTER, I64)
    o_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, os_in, os_o0, os_o1, os_o2,
                              O_IN_ONE, O_IN_CONST, BLOCK, N_OUTER, I64)
    idx = tl.load(idx_ptr + i_unit, mask=row_ok, other=0)
    # out-of-range indices (never seen on validated CPU input; -1 sentinels) decode to NaN
    bad = (idx < 0) | (idx >= NUM_CODES)
    if DIV_64:
        DT: tl.constexpr = tl.int64
    else:
        DT: tl.constexpr = tl.int32
    idx = tl.where(bad, 0, idx).to(DT)
    L_i = _lane_int(LEVELS, lane, D, D_PAD, DT)
    L_safe = tl.where(lane_ok, L_i, 1)
    basis = tl.where(lane_ok, _lane_int(BASIS, lane, D, D_PAD, DT), 1)
    k = (idx[:, None] // basis[None, :]) % L_safe[None, :]
    if VARIANT == 2:
        num = 2 * k - (L_safe - 1)[None, :]
        den = (L_safe - 1)[None, :]
    else:
        hw = (L_safe // 2)[None, :]
        num = k - hw
        den = hw
    code = tl.div_rn(num.to(tl.float32), tl.maximum(den, 1).to(tl.float32))
    code = tl.where(bad[:, None], float("nan"), code)
    if O_C_ONE:
        o_off = o_unit[:, None] + lane_off[None, :]
    else:
        o_off = o_unit[:, None] + lane_off[None, :] * os_c
    mask = row_ok[:, None] & lane_ok[None, :]
    tl.store(out_ptr + o_off, _cast_out(code, out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch geometry (host only: shapes and strides, never tensor values -> no device sync)
# --------------------------------------------------------------------------------------------


def _identity(kernel):
    return kernel


def _collapse(sizes, stride_lists):
    """Drop size-1 unit dims and merge neighbours that are collapsible in every tensor."""
    dims = [(s, [sl[i] for sl in stride_lists]) for i, s in enumerate(sizes) if s != 1]
    if not dims:
        return [1], [[0] for _ in stride_lists]
    out = [dims[0]]
    for s, st in dims[1:]:
        ps, pst = out[-1]
        if all(pst[t] == st[t] * s for t in range(len(st))):
            out[-1] = (ps * s, st)
        else:
            out.append((s, st))
    return [d[0] for d in out], [[d[1][t] for d in out] for t in range(len(stride_lists))]


def z_units(t, channel_first, ncb, d):
    """An operand shaped like z: (unit sizes, unit strides, channel stride, d); units are the
    (token, codebook) pairs, the codebook axis a unit dim of stride d * channel stride."""
    shape, strides = t.shape, t.stride()
    if channel_first:
        sizes = [shape[0], ncb] + list(shape[2:])
        return sizes, [strides[0], strides[1] * d] + list(strides[2:]), strides[1], d
    return list(shape[:-1]) + [ncb], list(strides[:-1]) + [strides[-1] * d], strides[-1], d


def index_units(idx, channel_first, ncb, channels=1, channel_dim=None):
    """An index operand in z's unit order: quantize indices (tokens..., ncb) have channels 1;
    residual indices have their stage axis at `channel_dim` as `channels` channels."""
    st = list(idx.stride())
    if channel_dim is not None:  # residual: one codebook, the stage axis is the channel axis
        cs = st.pop(channel_dim)
        return None, ([st[0], 0] + st[1:] if channel_first else st + [0]), cs, channels
    if ncb == 1:  # no codebook axis in idx: a size-1 one
        st = st + [1]
    if channel_first:  # z units (B, ncb, *S); index dims (B, *S, ncb)
        return None, [st[0], st[-1]] + st[1:-1], 0, 1
    return None, st, 0, 1


def _pad_outer(sizes, strides):
    """-> n_inner, (n_o1, n_o2), (s_in, s_o0, s_o1, s_o2) for up to MAX_OUTER outer dims."""
    n_outer = len(sizes) - 1
    osz = [1] * (MAX_OUTER - n_outer) + sizes[:-1]  # o0 slowest .. o2 fastest: right-aligned
    ost = [0] * (MAX_OUTER - n_outer) + strides[:-1]
    if n_outer == 1:
        o, n = (ost[2], 0, 0), (1, 1)
    elif n_outer == 2:
        o, n = (ost[1], ost[2], 0), (osz[2], 1)
    elif n_outer == 3:
        o, n = (ost[0], ost[1], ost[2]), (osz[1], osz[2])
    else:
        o, n = (0, 0, 0), (1, 1)
    return sizes[-1], n, (strides[-1],) + o


_FORCE_I64 = False  # tests flip this to run the 64-bit offset path on small tensors


def _flags(s_in, s_c, d):
    """(IN_ONE, IN_CONST, C_ONE) constexpr flags for one tensor's inner and channel strides."""
    c_one = s_c == 1
    in_one = s_in == 1
    in_const = d if (c_one and s_in == d and not in_one) else 0
    return in_one, in_const, c_one


class Geometry:
    """One launch: unit dims collapsed to one blocked inner dim plus up to MAX_OUTER outer dims.
    Per operand: strides (s_in, s_o0, s_o1, s_o2), channel stride, flags (IN_ONE, IN_CONST, C_ONE)."""

    def __init__(self, sizes, operands, numel, d, block_elems):
        usz, st = _collapse(sizes, [op[1] for op in operands])
        self.ok = len(usz) - 1 <= MAX_OUTER
        if not self.ok:
            return
        self.n_outer = len(usz) - 1
        padded = [_pad_outer(usz, s) for s in st]
        self.n_inner, (self.n_o1, self.n_o2), _ = padded[0]
        self.strides = [p[2] for p in padded]
        self.cstrides = [op[2] for op in operands]
        self.flags = [_flags(p[2][0], op[2], op[3]) for p, op in zip(padded, operands)]
        self.i64 = _FORCE_I64 or numel > INT32_MAX or any(
            sum((s - 1) * abs(x) for s, x in zip(usz, s_)) + (op[3] - 1) * abs(op[2]) > INT32_MAX
            for s_, op in zip(st, operands))
        self.d_pad = triton.next_power_of_2(d)
        block = max(16, block_elems // self.d_pad)
        self.block = min(block, max(16, triton.next_power_of_2(self.n_inner)))
        self.grid = (triton.cdiv(self.n_inner, self.block) * (math.prod(usz[:-1]) if self.n_outer else 1),)

    def operand(self, i, channel=True):
        """Kernel arguments of operand i: its four unit strides (and its channel stride)."""
        return (*self.strides[i], self.cstrides[i]) if channel else tuple(self.strides[i])

    def common(self):
        return dict(N_OUTER=self.n_outer, I64=self.i64, D_PAD=self.d_pad, BLOCK=self.block)


def on_device(t: torch.Tensor):
    """Launch on t's device (a CUDA device guard), not on whatever device is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def plan(make, d, block_elems=2048):
    """Geometry of the operands that make(copy) describes ((sizes, operands, numel, tensors));
    layouts with more than MAX_OUTER + 1 non-collapsible unit dims are retried as contiguous
    copies (rare, documented)."""
    for copy in (False, True):
        sizes, operands, numel, tensors = make(copy)
        geo = Geometry(sizes, operands, numel, d, block_elems)
        if geo.ok:
            return geo, tensors
    raise AssertionError("a contiguous layout always collapses")


# --------------------------------------------------------------------------------------------
# Launchers. `cst`: the constexpr payload of the level set (fsq_kernels/ops/triton.py).
# --------------------------------------------------------------------------------------------


def fsq_forward(z: torch.Tensor, cst: dict, variant: int, hard_clamp: bool, channel_first: bool,
                num_codebooks: int, return_indices: bool, wrap=_identity):
    """codes (z.dtype, z's shape and memory format) and indices (or None)."""
    levels = cst["LEVELS"]
    d, ncb = len(levels), int(num_codebooks)
    idx_shape = shapes.index_shape(z.shape, channel_first, ncb) if return_indices else (0,)
    idx = torch.empty(idx_shape, dtype=shapes.index_dtype(levels), device=z.device)
    codes = torch.empty_like(z)
    if z.numel() == 0:
        return codes, (idx if return_indices else None)
    dense_idx = idx if return_indices else torch.empty(
        shapes.index_shape(z.shape, channel_first, ncb), device="meta")  # strides only

    def make(copy):
        zz = z.contiguous() if copy else z
        cc = torch.empty_like(zz) if copy else codes
        zu, cu, iu = z_units(zz, channel_first, ncb, d), z_units(cc, channel_first, ncb, d), \
            index_units(dense_idx, channel_first, ncb)
        return zu[0], [zu, cu, iu], zz.numel(), (zz, cc)

    geo, (zz, codes) = plan(make, d)
    with on_device(zz):  # the tensor's device, not the current one
        wrap(_fsq_fwd_kernel)[geo.grid](
            zz, codes, idx,
            geo.n_inner, geo.n_o1, geo.n_o2,
            *geo.operand(0), *geo.operand(1), *geo.operand(2, channel=False),
            LEVELS=levels, HALF_L=cst["HALF_L"], OFFSET=cst["OFFSET"], SHIFT=cst["SHIFT"], IN_SCALE=cst["IN_SCALE"],
            BASIS=cst["BASIS"], BOUNDS=cst["BOUNDS"], MAX_B=cst["MAX_B"],
            VARIANT=variant, HARD_CLAMP=bool(hard_clamp), USE_CMP=cst["USE_CMP"],
            WRITE_INDEX=bool(return_indices), INDEX_64=cst["INDEX_64"],
            Z_IN_ONE=geo.flags[0][0], Z_IN_CONST=geo.flags[0][1], Z_C_ONE=geo.flags[0][2],
            C_IN_ONE=geo.flags[1][0], C_IN_CONST=geo.flags[1][1], C_C_ONE=geo.flags[1][2],
            I_IN_ONE=geo.flags[2][0],
            D=d, **geo.common(), num_warps=4,
        )
    return codes, (idx if return_indices else None)


def fsq_backward(grad_codes: torch.Tensor, z: torch.Tensor, cst: dict, variant: int,
                 hard_clamp: bool, channel_first: bool, num_codebooks: int, wrap=_identity):
    """grad_z (z.dtype, z's shape and memory format) from grad_codes and z in one pass."""
    d, ncb = len(cst["LEVELS"]), int(num_codebooks)
    grad_z = torch.empty_like(z)
    if z.numel() == 0:
        return grad_z
    grad_codes = grad_codes.to(z.dtype)

    def make(copy):
        zz, gg = (z.contiguous(), grad_codes.contiguous()) if copy else (z, grad_codes)
        oo = torch.empty_like(zz) if copy else grad_z
        ops = [z_units(t, channel_first, ncb, d) for t in (zz, gg, oo)]
        return ops[0][0], ops, zz.numel(), (zz, gg, oo)

    geo, (zz, gg, grad_z) = plan(make, d)
    zf, gf, of = geo.flags
    with on_device(zz):  # the tensor's device, not the current one
        wrap(_fsq_bwd_kernel)[geo.grid](
            zz, gg, grad_z,
            geo.n_inner, geo.n_o1, geo.n_o2,
            *geo.operand(0), *geo.operand(1), *geo.operand(2),
            SHIFT=cst["SHIFT"], GRAD_SCALE=cst["GRAD_SCALE"], IN_SCALE=cst["IN_SCALE"],
            VARIANT=variant, HARD_CLAMP=bool(hard_clamp),
            Z_IN_ONE=zf[0], Z_IN_CONST=zf[1], Z_C_ONE=zf[2],
            G_IN_ONE=gf[0], G_IN_CONST=gf[1], G_C_ONE=gf[2],
            O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
            D=d, **geo.common(), num_warps=4,
        )
    return grad_z


def fsq_decode(indices: torch.Tensor, cst: dict, variant: int, channel_first: bool,
               num_codebooks: int, dtype=None, wrap=_identity):
    """codes from indices: channel-last (..., C) or channel-first (B, C, ...), contiguous."""
    levels = cst["LEVELS"]
    d, ncb = len(levels), int(num_codebooks)
    dtype = torch.float32 if dtype is None else dtype
    if indices.dtype not in (torch.int32, torch.int64):
        indices = indices.to(torch.int64)
    out = torch.empty(shapes.decode_shape(indices.shape, levels, channel_first, ncb), dtype=dtype,
                      device=indices.device)
    if out.numel() == 0:
        return out

    def make(copy):
        ii = indices.contiguous() if copy else indices
        ou = z_units(out, channel_first, ncb, d)
        return ou[0], [index_units(ii, channel_first, ncb), ou], out.numel(), (ii,)

    geo, (ii,) = plan(make, d)
    of = geo.flags[1]
    with on_device(ii):  # the tensor's device, not the current one
        wrap(_fsq_decode_kernel)[geo.grid](
            ii, out,
            geo.n_inner, geo.n_o1, geo.n_o2,
            *geo.operand(0, channel=False), *geo.operand(1),
            LEVELS=levels, BASIS=cst["BASIS"], NUM_CODES=cst["NUM_CODES"],
            VARIANT=variant, DIV_64=cst["INDEX_64"],
            I_IN_ONE=geo.flags[0][0],
            O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
            D=d, **geo.common(), num_warps=4,
        )
    return out
