"""Triton kernels for FSQ (forward, backward, decode) and their launchers.

Nothing here knows about autograd or torch.library: the op layer
(``fsq_kernels/ops/triton.py``) registers the ops and passes ``wrap_triton`` as the ``wrap``
argument of the launchers, so the same launchers run eagerly, under ``torch.compile`` and
under ``TRITON_INTERPRET=1`` (CPU tensors).

Design (see DESIGN.md section 1 for the math contract):

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
  no gather in the kernel.  The price is one compilation per level set (x variant, dtype,
  layout), which a training job pays once.
* Forward: for level counts up to ``CMP_MAX_LEVELS`` the level index is the number of
  boundaries below z (DESIGN "The forward needs no tanh"); the float64 boundaries are rounded
  *directed* to float32 (down for ``z > t``, up for ``z >= t``) so that comparing a float32 z
  with them is exactly comparing it with the float64 boundary.  For larger level counts the
  comparison chain would cost more than the memory traffic, so the kernel evaluates the
  bound (tanh from exp2) and rounds half-to-even in float32 instead; both are inside the
  tolerance window of the contract.
* All math in float32 registers; codes are stored in the input dtype (bfloat16 rounded to
  nearest even by integer ops, see ``_cast_out``); indices int32 or int64 (-1 for a codebook
  with a NaN channel).  Backward reads z and grad_codes once and writes grad_z; decode reads
  one index per (token, codebook) and writes its d codes, with no codebook in memory.
* Launchers read shapes and strides only (never tensor values): no host-device sync.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from .. import reference

# Variants as kernel constexprs.
PAPER, ATANH, SYMMETRIC = 0, 1, 2
VARIANTS = {"paper": PAPER, "atanh": ATANH, "symmetric": SYMMETRIC}

EPS = 1e-3
CMP_MAX_LEVELS = 32  # comparison path when max(levels) <= this, tanh path above
MAX_OUTER = 3  # outer unit dimensions handled in-kernel (plus one blocked inner dimension)
INT32_MAX = 2**31 - 1

_TWO_LOG2E = tl.constexpr(2.0 * 1.4426950408889634)  # tanh via exp2: e^(2x) = 2^(2x*log2(e))

# --------------------------------------------------------------------------------------------
# Per-level-set constants (host, float64, cached)
# --------------------------------------------------------------------------------------------


def _f32_round(x: float, mode: str) -> float:
    """Round a float64 to a float32 value: 'nearest', 'down' (largest <= x) or 'up'."""
    if math.isinf(x) or math.isnan(x):
        return x
    f = struct.unpack("f", struct.pack("f", x))[0]  # nearest (may overflow to inf: fine)
    if mode == "down" and f > x:
        f = _next_f32(f, -1)
    elif mode == "up" and f < x:
        f = _next_f32(f, +1)
    return f


def _next_f32(f: float, direction: int) -> float:
    bits = struct.unpack("<i", struct.pack("<f", f))[0]
    if f == 0.0:
        tiny = struct.unpack("<f", struct.pack("<i", 1))[0]
        return tiny if direction > 0 else -tiny
    if (f > 0) == (direction > 0):
        bits += 1
    else:
        bits -= 1
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def level_constants(levels: tuple[int, ...], variant: str, hard_clamp: bool) -> dict:
    """Constexpr payload for one level set: python tuples of ints / float32-exact floats.

    Keys: LEVELS, HW (L // 2), SCALE_CODE (denominator of the code), HALF_L, OFFSET, SHIFT,
    GRAD_SCALE (half_l / hw, or 1 for symmetric), BASIS, BOUNDS (per channel, L_i - 1 float32
    boundaries; empty on the tanh path), MAX_B, USE_CMP, INDEX_64, NUM_CODES.
    The float64 numbers come from fsq_kernels.reference (channel_constants, level_boundaries,
    DESIGN "The forward needs no tanh"); only their rounding to float32 happens here.
    """
    return _level_constants(tuple(int(x) for x in levels), variant, bool(hard_clamp))


_CONST_CACHE: dict = {}


def _level_constants(levels, variant, hard_clamp):
    key = (levels, variant, hard_clamp)
    hit = _CONST_CACHE.get(key)
    if hit is not None:
        return hit
    v = VARIANTS[variant]
    consts = reference.channel_constants(levels, variant, hard_clamp)
    bounds64 = reference.level_boundaries(levels, variant, hard_clamp)
    max_b = max(levels) - 1
    # k = #{z > t} (paper/atanh): round t down; k = #{z >= t} (symmetric): round t up.  Then a
    # float32 z compares with the float32 boundary exactly as with the float64 one.
    direction = "up" if v == SYMMETRIC else "down"
    use_cmp = max(levels) <= CMP_MAX_LEVELS
    # Ragged rows, no padding, and none at all on the tanh path: constexpr values stay finite
    # (torch.compile writes them into generated source, where inf is not a literal).
    bounds = tuple(tuple(_f32_round(t, direction) for t in row) for row in bounds64) if use_cmp else ()
    grad_scales = [1.0 if v == SYMMETRIC else h / hw
                   for h, hw in zip(consts["half_l"], consts["half_width"])]
    nearest = lambda xs: tuple(_f32_round(float(x), "nearest") for x in xs)  # noqa: E731
    num_codes = math.prod(levels)
    out = dict(
        LEVELS=tuple(levels),
        HALF_L=nearest(consts["half_l"]),
        OFFSET=nearest(consts["offset"]),
        SHIFT=nearest(consts["shift"]),
        GRAD_SCALE=nearest(grad_scales),
        BASIS=tuple(reference.basis(levels)),
        BOUNDS=bounds,
        MAX_B=max_b if use_cmp else 0,
        USE_CMP=use_cmp,
        INDEX_64=num_codes > INT32_MAX,
        NUM_CODES=num_codes,
    )
    _CONST_CACHE[key] = out
    return out


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
                 D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Level index k in [0, L-1] ([BLOCK, D_PAD] int32) of float32 z; NaN gives 0 (callers
    mark NaN themselves).  Shared by the FSQ forward and the residual kernels."""
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
    z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)  # the only read of z

    L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
    L_max = (L_i - 1)[None, :]
    k = _level_index(z, lane, L_i, LEVELS, HALF_L, OFFSET, SHIFT, BOUNDS, MAX_B,
                     VARIANT, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK)

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
    SHIFT: tl.constexpr, GRAD_SCALE: tl.constexpr,
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
    z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)

    if VARIANT == 2:
        x = z
    else:
        x = z + _lane_f32(SHIFT, lane, D, D_PAD, 0.0)[None, :]
    if HARD_CLAMP:
        d = tl.where((x > -1.0) & (x < 1.0), 1.0, 0.0)
        d = tl.where(x != x, x, d)  # NaN stays NaN, as in the reference
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


def _contig_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return list(reversed(strides))


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


def _z_units(shape, strides, channel_first, ncb, d):
    """Unit dims (sizes, strides) and channel stride of a z-shaped tensor (elements)."""
    if channel_first:
        sizes = [shape[0], ncb] + list(shape[2:])
        st = [strides[0], strides[1] * d] + list(strides[2:])
        return sizes, st, strides[1]
    sizes = list(shape[:-1]) + [ncb]
    st = list(strides[:-1]) + [strides[-1] * d]
    return sizes, st, strides[-1]


def _idx_units(tok_shape, idx_strides, channel_first, ncb):
    """Unit strides of an index tensor of shape tok_shape + (ncb,), in z's unit order."""
    if channel_first:
        # z units (B, ncb, *S); index dims (B, *S, ncb)
        return [idx_strides[0], idx_strides[-1]] + list(idx_strides[1:-1])
    return list(idx_strides)


def _pad_outer(sizes, strides):
    """-> n_inner, (n_o1, n_o2), (s_in, s_o0, s_o1, s_o2) for up to MAX_OUTER outer dims."""
    n_outer = len(sizes) - 1
    outer_sizes = sizes[:-1]
    outer_strides = strides[:-1]
    # o0 slowest .. o2 fastest: right-align the outer dims
    pad = MAX_OUTER - n_outer
    osz = [1] * pad + outer_sizes
    ost = [0] * pad + outer_strides
    # only the last n_outer entries are used by the kernel; N_OUTER selects the formula
    if n_outer == 1:
        o = (ost[2], 0, 0)
        n = (1, 1)
    elif n_outer == 2:
        o = (ost[1], ost[2], 0)
        n = (osz[2], 1)
    elif n_outer == 3:
        o = (ost[0], ost[1], ost[2])
        n = (osz[1], osz[2])
    else:
        o = (0, 0, 0)
        n = (1, 1)
    return sizes[-1], n, (strides[-1],) + o


_FORCE_I64 = False  # tests flip this to run the 64-bit offset path on small tensors


def _span(sizes, strides):
    return sum((s - 1) * abs(st) for s, st in zip(sizes, strides))


def _block_for(d_pad, n_inner):
    block = max(16, 2048 // d_pad)
    return min(block, max(16, triton.next_power_of_2(n_inner)))


def _flags(s_in, s_c, d):
    """(IN_ONE, IN_CONST, C_ONE) constexpr flags for one tensor's inner and channel strides."""
    c_one = s_c == 1
    in_one = s_in == 1
    in_const = d if (c_one and s_in == d and not in_one) else 0
    return in_one, in_const, c_one


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def fsq_forward(z: torch.Tensor, levels, variant: str, hard_clamp: bool, channel_first: bool,
                num_codebooks: int, return_indices: bool, wrap=_identity):
    """codes (z.dtype, z's shape and memory format) and indices (or None)."""
    levels = tuple(int(x) for x in levels)
    cst = level_constants(levels, variant, hard_clamp)
    d, ncb = len(levels), int(num_codebooks)
    idt = torch.int64 if cst["INDEX_64"] else torch.int32
    tok_shape = (z.shape[0],) + tuple(z.shape[2:]) if channel_first else tuple(z.shape[:-1])
    idx_shape = tok_shape + ((ncb,) if ncb > 1 else ())
    codes = torch.empty_like(z)
    idx = torch.empty(idx_shape if return_indices else (0,), dtype=idt, device=z.device)
    if z.numel() == 0:
        return codes, (idx if return_indices else None)

    zz = z
    for _attempt in range(2):
        sizes, zst, zsc = _z_units(zz.shape, zz.stride(), channel_first, ncb, d)
        _, cst_u, csc = _z_units(codes.shape, codes.stride(), channel_first, ncb, d)
        ist = _idx_units(tok_shape, _contig_strides(tok_shape + (ncb,)), channel_first, ncb)
        usz, (zst, cst_u, ist) = _collapse(sizes, [zst, cst_u, ist])
        if len(usz) - 1 <= MAX_OUTER:
            break
        zz = z.contiguous()  # > 4 non-collapsible unit dims: rare, documented fallback
        codes = torch.empty_like(zz)
    n_outer = len(usz) - 1
    n_inner, (n_o1, n_o2), zs = _pad_outer(usz, zst)
    _, _, cs = _pad_outer(usz, cst_u)
    _, _, is_ = _pad_outer(usz, ist)
    i64 = max(_span(usz, zst) + (d - 1) * abs(zsc), _span(usz, cst_u) + (d - 1) * abs(csc),
              zz.numel()) > INT32_MAX or _FORCE_I64
    z_in_one, z_in_const, z_c_one = _flags(zs[0], zsc, d)
    c_in_one, c_in_const, c_c_one = _flags(cs[0], csc, d)
    d_pad = triton.next_power_of_2(d)
    block = _block_for(d_pad, n_inner)
    n_units_outer = math.prod(usz[:-1]) if n_outer else 1
    grid = (triton.cdiv(n_inner, block) * n_units_outer,)
    wrap(_fsq_fwd_kernel)[grid](
        zz, codes, idx,
        n_inner, n_o1, n_o2,
        *zs, zsc,
        *cs, csc,
        *is_,
        LEVELS=cst["LEVELS"], HALF_L=cst["HALF_L"], OFFSET=cst["OFFSET"], SHIFT=cst["SHIFT"],
        BASIS=cst["BASIS"], BOUNDS=cst["BOUNDS"], MAX_B=cst["MAX_B"],
        VARIANT=VARIANTS[variant], HARD_CLAMP=bool(hard_clamp), USE_CMP=cst["USE_CMP"],
        WRITE_INDEX=bool(return_indices), INDEX_64=cst["INDEX_64"],
        Z_IN_ONE=z_in_one, Z_IN_CONST=z_in_const, Z_C_ONE=z_c_one,
        C_IN_ONE=c_in_one, C_IN_CONST=c_in_const, C_C_ONE=c_c_one,
        I_IN_ONE=is_[0] == 1,
        N_OUTER=n_outer, I64=i64, D=d, D_PAD=d_pad, BLOCK=block,
        num_warps=4,
    )
    return codes, (idx if return_indices else None)


def fsq_backward(z: torch.Tensor, grad_codes: torch.Tensor, levels, variant: str,
                 hard_clamp: bool, channel_first: bool, num_codebooks: int, wrap=_identity):
    """grad_z (z.dtype, z's shape and memory format) from z and grad_codes in one pass."""
    levels = tuple(int(x) for x in levels)
    cst = level_constants(levels, variant, hard_clamp)
    d, ncb = len(levels), int(num_codebooks)
    grad_z = torch.empty_like(z)
    if z.numel() == 0:
        return grad_z
    if grad_codes.dtype != z.dtype:
        grad_codes = grad_codes.to(z.dtype)
    zz, gg = z, grad_codes
    for _attempt in range(2):
        sizes, zst, zsc = _z_units(zz.shape, zz.stride(), channel_first, ncb, d)
        _, gst, gsc = _z_units(gg.shape, gg.stride(), channel_first, ncb, d)
        _, ost, osc = _z_units(grad_z.shape, grad_z.stride(), channel_first, ncb, d)
        usz, (zst, gst, ost) = _collapse(sizes, [zst, gst, ost])
        if len(usz) - 1 <= MAX_OUTER:
            break
        zz, gg = z.contiguous(), grad_codes.contiguous()
        grad_z = torch.empty_like(zz)
    n_outer = len(usz) - 1
    n_inner, (n_o1, n_o2), zs = _pad_outer(usz, zst)
    _, _, gs = _pad_outer(usz, gst)
    _, _, os_ = _pad_outer(usz, ost)
    i64 = max(_span(usz, zst) + (d - 1) * abs(zsc), _span(usz, gst) + (d - 1) * abs(gsc),
              _span(usz, ost) + (d - 1) * abs(osc), zz.numel()) > INT32_MAX or _FORCE_I64
    zf = _flags(zs[0], zsc, d)
    gf = _flags(gs[0], gsc, d)
    of = _flags(os_[0], osc, d)
    d_pad = triton.next_power_of_2(d)
    block = _block_for(d_pad, n_inner)
    n_units_outer = math.prod(usz[:-1]) if n_outer else 1
    grid = (triton.cdiv(n_inner, block) * n_units_outer,)
    wrap(_fsq_bwd_kernel)[grid](
        zz, gg, grad_z,
        n_inner, n_o1, n_o2,
        *zs, zsc, *gs, gsc, *os_, osc,
        SHIFT=cst["SHIFT"], GRAD_SCALE=cst["GRAD_SCALE"],
        VARIANT=VARIANTS[variant], HARD_CLAMP=bool(hard_clamp),
        Z_IN_ONE=zf[0], Z_IN_CONST=zf[1], Z_C_ONE=zf[2],
        G_IN_ONE=gf[0], G_IN_CONST=gf[1], G_C_ONE=gf[2],
        O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
        N_OUTER=n_outer, I64=i64, D=d, D_PAD=d_pad, BLOCK=block,
        num_warps=4,
    )
    return grad_z


def fsq_decode(indices: torch.Tensor, levels, variant: str, channel_first: bool,
               num_codebooks: int, dtype=None, wrap=_identity):
    """codes from indices: channel-last (..., C) or channel-first (B, C, ...), contiguous."""
    levels = tuple(int(x) for x in levels)
    cst = level_constants(levels, variant, False)
    d, ncb = len(levels), int(num_codebooks)
    dtype = torch.float32 if dtype is None else dtype
    if indices.dtype not in (torch.int32, torch.int64):
        indices = indices.to(torch.int64)
    idx = indices if ncb > 1 else indices.unsqueeze(-1)
    tok_shape = tuple(idx.shape[:-1])
    if channel_first:
        out_shape = (tok_shape[0], ncb * d) + tok_shape[1:]
    else:
        out_shape = tok_shape + (ncb * d,)
    out = torch.empty(out_shape, dtype=dtype, device=indices.device)
    if out.numel() == 0:
        return out
    ii = idx
    for _attempt in range(2):
        ist = _idx_units(tok_shape, list(ii.stride()), channel_first, ncb)
        sizes, ost, osc = _z_units(out.shape, out.stride(), channel_first, ncb, d)
        usz, (ist_c, ost_c) = _collapse(sizes, [ist, ost])
        if len(usz) - 1 <= MAX_OUTER:
            break
        ii = idx.contiguous()
    n_outer = len(usz) - 1
    n_inner, (n_o1, n_o2), is_ = _pad_outer(usz, ist_c)
    _, _, os_ = _pad_outer(usz, ost_c)
    i64 = max(_span(usz, ist_c), _span(usz, ost_c) + (d - 1) * abs(osc), out.numel()) > INT32_MAX or _FORCE_I64
    of = _flags(os_[0], osc, d)
    d_pad = triton.next_power_of_2(d)
    block = _block_for(d_pad, n_inner)
    n_units_outer = math.prod(usz[:-1]) if n_outer else 1
    grid = (triton.cdiv(n_inner, block) * n_units_outer,)
    wrap(_fsq_decode_kernel)[grid](
        ii, out,
        n_inner, n_o1, n_o2,
        *is_, *os_, osc,
        LEVELS=cst["LEVELS"], BASIS=cst["BASIS"], NUM_CODES=cst["NUM_CODES"],
        VARIANT=VARIANTS[variant], DIV_64=cst["INDEX_64"],
        I_IN_ONE=is_[0] == 1,
        O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
        N_OUTER=n_outer, I64=i64, D=d, D_PAD=d_pad, BLOCK=block,
        num_warps=4,
    )
    return out
