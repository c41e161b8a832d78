"""Shared pieces of the Triton kernels: variant ids, device helpers (tanh from exp2,
round-half-even, bfloat16 rounding, per-lane constexpr selection, the level index) and the launch
geometry (strided unit dims collapsed to one blocked inner dim plus up to MAX_OUTER outer dims).
Used by the FSQ (with dither.py's helpers), residual and usage kernels; see fsq.py for the design."""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

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
def _bf16_high_bits(x):
    """The bfloat16 nearest to float32 x (ties to even), as the high 16 bits of a uint32; NaN: 0x7FC0."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return tl.where(x != x, 0x7FC0, rounded >> 16)


@triton.jit
def _cast_out(x, DTYPE: tl.constexpr):
    """float32 -> output dtype, round to nearest even.  For bfloat16 the rounding is spelled out
    in integer ops: the interpreter's float32 -> bfloat16 cast truncates, and this way the GPU
    runs exactly the code the CPU tests run (a few integer ops on a memory-bound kernel)."""
    if DTYPE == tl.bfloat16:
        return _bf16_high_bits(x).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE and widened back: the value a store in DTYPE and a load give
    (the dither adds its noise to the code as stored, as the reference does)."""
    if DTYPE == tl.bfloat16:
        y = (_bf16_high_bits(x) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


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
def _tile(unit, lane_off, s_c, C_ONE: tl.constexpr):
    """[BLOCK, D_PAD] element offsets of a tile: its units' first-channel offsets plus the lanes
    times the channel stride (C_ONE: the stride is the constant 1)."""
    if C_ONE:
        off = unit[:, None] + lane_off[None, :]
    else:
        off = unit[:, None] + lane_off[None, :] * s_c
    return off


@triton.jit
def _grid_code(k, L_i, lane_ok, VARIANT: tl.constexpr):
    """The code (float32, one rounding) of level index k: (2k - (L-1))/(L-1) for symmetric,
    (k - L//2)/(L//2) otherwise; padding lanes give 0."""
    if VARIANT == 2:
        num = 2 * k - (L_i - 1)[None, :]
        den = (L_i - 1)[None, :]
    else:
        hw = (L_i // 2)[None, :]
        num = k - hw
        den = hw
    den = tl.where(lane_ok[None, :], den, 1)  # padding lanes: no 0/0
    return tl.div_rn(num.to(tl.float32), den.to(tl.float32))


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
