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
* Training (constexprs DITHER, USAGE; the op fsq_triton::quantize_train): the forward adds the
  dither to the code it stores (docs/dither.md; helpers in dither.py), its Philox counter the
  element's row-major position in z's logical shape, an extra strides-only operand of the
  geometry, so the noise is independent of layout and launch; it writes the noiseless indices
  and adds each (token, codebook) to a zeroed (num_codebooks, prod(L)) histogram (usage.py's
  `_count_usage`: a block histogram with one atomic per non-zero bin, or per-index atomics beyond
  its limit).
  The backward regenerates the words and applies the dither's mask.
* Launchers read shapes and strides only (never tensor values): no host-device sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import shapes
from .common import (  # noqa: F401  (PAPER..VARIANTS, CMP_MAX_LEVELS: re-exported for the op layer)
    PAPER,
    ATANH,
    SYMMETRIC,
    IFSQ,
    VARIANTS,
    CMP_MAX_LEVELS,
    _cast_out,
    _grid_code,
    _identity,
    _lane_f32,
    _lane_int,
    _level_index,
    _load_f32,
    _one_minus_tanh_abs,
    _round_to,
    _tile,
    _unit_offsets,
    index_units,
    on_device,
    plan,
    z_units,
)
from .dither import DitherArgs, _dither, _dither_grad, per_batch_element
from .usage import _count_usage, histogram_bins


@triton.jit
def _fsq_fwd_kernel(
    z_ptr, codes_ptr, idx_ptr, usage_ptr, key_offset_ptr,
    n_inner, n_o1, n_o2,
    zs_in, zs_o0, zs_o1, zs_o2, zs_c,
    cs_in, cs_o0, cs_o1, cs_o2, cs_c,
    is_in, is_o0, is_o1, is_o2,
    ps_in, ps_o0, ps_o1, ps_o2, ps_c,
    per_batch, p,
    LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
    IN_SCALE: tl.constexpr,
    BASIS: tl.constexpr, BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
    VARIANT: tl.constexpr, HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr,
    WRITE_INDEX: tl.constexpr, INDEX_64: tl.constexpr,
    DITHER: tl.constexpr, STEPS: tl.constexpr, USAGE: tl.constexpr, NUM_CODES: tl.constexpr, NCB: tl.constexpr,
    HIST_BINS: tl.constexpr,
    Z_IN_ONE: tl.constexpr, Z_IN_CONST: tl.constexpr, Z_C_ONE: tl.constexpr,
    C_IN_ONE: tl.constexpr, C_IN_CONST: tl.constexpr, C_C_ONE: tl.constexpr,
    I_IN_ONE: tl.constexpr, P_IN_ONE: tl.constexpr, P_IN_CONST: tl.constexpr, P_C_ONE: tl.constexpr,
    N_OUTER: tl.constexpr, I64: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, D_PAD)
    lane_ok = lane < D
    lane_off = lane.to(tl.int64) if I64 else lane  # channel offsets may pass 2^31

    z_unit, row_ok = _unit_offsets(pid, n_inner, n_o1, n_o2, zs_in, zs_o0, zs_o1, zs_o2,
                                   Z_IN_ONE, Z_IN_CONST, BLOCK, N_OUTER, I64)
    mask = row_ok[:, None] & lane_ok[None, :]
    z = _load_f32(z_ptr + _tile(z_unit, lane_off, zs_c, Z_C_ONE), mask)  # the only read of z

    L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
    k = _level_index(z, lane, L_i, LEVELS, HALF_L, OFFSET, SHIFT, BOUNDS, MAX_B,
                     VARIANT, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK, IN_SCALE)
    is_nan = z != z
    code = tl.where(is_nan, z, _grid_code(k, L_i, lane_ok, VARIANT))
    if DITHER != 0:  # the noise of each element at counter offset + its row-major position
        p_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, ps_in, ps_o0, ps_o1, ps_o2,
                                  P_IN_ONE, P_IN_CONST, BLOCK, N_OUTER, I64)
        pos = _tile(p_unit, lane_off, ps_c, P_C_ONE).to(tl.int64)
        code = _dither(_round_to(code, codes_ptr.dtype.element_ty), z, pos, p_unit.to(tl.int64), lane,
                       key_offset_ptr, per_batch, p, STEPS, DITHER, D, D_PAD)

    c_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, cs_in, cs_o0, cs_o1, cs_o2,
                              C_IN_ONE, C_IN_CONST, BLOCK, N_OUTER, I64)
    tl.store(codes_ptr + _tile(c_unit, lane_off, cs_c, C_C_ONE), _cast_out(code, codes_ptr.dtype.element_ty),
             mask=mask)

    if WRITE_INDEX:  # of the noiseless code
        IDT: tl.constexpr = idx_ptr.dtype.element_ty
        basis = _lane_int(BASIS, lane, D, D_PAD, IDT)
        contrib = tl.where(mask, k.to(IDT) * basis[None, :], 0)
        idx = tl.sum(contrib, axis=1)
        any_nan = tl.max(tl.where(mask & is_nan, 1, 0), axis=1) > 0
        idx = tl.where(any_nan, -1, idx)
        i_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, is_in, is_o0, is_o1, is_o2,
                                  I_IN_ONE, 0, BLOCK, N_OUTER, I64)
        tl.store(idx_ptr + i_unit, idx.to(IDT), mask=row_ok)
        if USAGE:  # the histogram, (NCB, NUM_CODES); the index tensor is contiguous: slot = unit % NCB
            bins = (i_unit % NCB).to(tl.int64) * NUM_CODES + idx.to(tl.int64)
            _count_usage(usage_ptr, bins, row_ok & (idx >= 0), HIST_BINS)  # block histogram or per-index atomics


@triton.jit
def _fsq_bwd_kernel(
    z_ptr, g_ptr, gz_ptr, key_offset_ptr,
    n_inner, n_o1, n_o2,
    zs_in, zs_o0, zs_o1, zs_o2, zs_c,
    gs_in, gs_o0, gs_o1, gs_o2, gs_c,
    os_in, os_o0, os_o1, os_o2, os_c,
    ps_in, ps_o0, ps_o1, ps_o2, ps_c,
    per_batch, p,
    LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr, SHIFT: tl.constexpr,
    GRAD_SCALE: tl.constexpr, IN_SCALE: tl.constexpr, BOUNDS: tl.constexpr, MAX_B: tl.constexpr,
    VARIANT: tl.constexpr, HARD_CLAMP: tl.constexpr, USE_CMP: tl.constexpr, DITHER: tl.constexpr,
    Z_IN_ONE: tl.constexpr, Z_IN_CONST: tl.constexpr, Z_C_ONE: tl.constexpr,
    G_IN_ONE: tl.constexpr, G_IN_CONST: tl.constexpr, G_C_ONE: tl.constexpr,
    O_IN_ONE: tl.constexpr, O_IN_CONST: tl.constexpr, O_C_ONE: tl.constexpr,
    P_IN_ONE: tl.constexpr, P_IN_CONST: tl.constexpr, P_C_ONE: tl.constexpr,
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
    z = _load_f32(z_ptr + _tile(z_unit, lane_off, zs_c, Z_C_ONE), mask)
    g = _load_f32(g_ptr + _tile(g_unit, lane_off, gs_c, G_C_ONE), mask)

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
    if DITHER == 0:
        gz = g * d
    else:  # regenerate the words; "peer" also recomputes the noiseless code (as stored) from z
        p_unit, _ = _unit_offsets(pid, n_inner, n_o1, n_o2, ps_in, ps_o0, ps_o1, ps_o2,
                                  P_IN_ONE, P_IN_CONST, BLOCK, N_OUTER, I64)
        pos = _tile(p_unit, lane_off, ps_c, P_C_ONE).to(tl.int64)
        code = z
        if DITHER == 1:
            L_i = _lane_int(LEVELS, lane, D, D_PAD, tl.int32)
            k = _level_index(z, lane, L_i, LEVELS, HALF_L, OFFSET, SHIFT, BOUNDS, MAX_B,
                             VARIANT, HARD_CLAMP, USE_CMP, D, D_PAD, BLOCK, IN_SCALE)
            code = tl.where(z != z, z, _round_to(_grid_code(k, L_i, lane_ok, VARIANT), z_ptr.dtype.element_ty))
        gz = _dither_grad(g, d, code, z, pos, p_unit.to(tl.int64), key_offset_ptr, per_batch, p, DITHER)
    tl.store(gz_ptr + _tile(o_unit, lane_off, os_c, O_C_ONE), _cast_out(gz, gz_ptr.dtype.element_ty), mask=mask)


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
    code = tl.where(bad[:, None], float("nan"), _grid_code(k, L_safe, lane_ok, VARIANT))
    mask = row_ok[:, None] & lane_ok[None, :]
    tl.store(out_ptr + _tile(o_unit, lane_off, os_c, O_C_ONE), _cast_out(code, out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers. `cst`: the constexpr payload of the level set (fsq_kernels/ops/triton.py).
# --------------------------------------------------------------------------------------------


def _positions(z: torch.Tensor, channel_first: bool, ncb: int, d: int):
    """An operand whose offsets are the elements' row-major positions in z's logical shape (the
    dither's Philox counters): a contiguous meta tensor of z's shape, strides only."""
    return z_units(torch.empty(z.shape, device="meta"), channel_first, ncb, d)


def _dither_args(geo, dither: DitherArgs | None, shape) -> tuple[tuple, dict]:
    """The kernels' dither arguments: (position strides, per_batch, p) and the constexprs; the
    position operand is the last one of `geo` when dithering."""
    if dither is None:
        return (0, 0, 0, 0, 0, 1, 0.0), dict(DITHER=0, P_IN_ONE=False, P_IN_CONST=0, P_C_ONE=False)
    flags = geo.flags[-1]
    return ((*geo.operand(len(geo.flags) - 1), per_batch_element(shape), float(dither.p)),
            dict(DITHER=dither.mode, P_IN_ONE=flags[0], P_IN_CONST=flags[1], P_C_ONE=flags[2]))


def fsq_forward(z: torch.Tensor, cst: dict, variant: int, hard_clamp: bool, channel_first: bool,
                num_codebooks: int, return_indices: bool, wrap=_identity, *,
                dither: DitherArgs | None = None, usage: torch.Tensor | None = None):
    """codes (z.dtype, z's shape and memory format) and indices (or None). With `dither` the codes
    are the dithered output (the indices stay the noiseless code's); `usage`, a zeroed
    (num_codebooks, prod(levels)) int64 tensor, receives the histogram of the indices."""
    levels = cst["LEVELS"]
    d, ncb = len(levels), int(num_codebooks)
    idx_shape = shapes.index_shape(z.shape, channel_first, ncb) if return_indices else (0,)
    idx = torch.empty(idx_shape, dtype=shapes.index_dtype(levels), device=z.device)
    codes = torch.empty_like(z)
    if z.numel() == 0:
        return codes, (idx if return_indices else None)
    assert usage is None or return_indices, "the histogram counts the indices"
    dense_idx = idx if return_indices else torch.empty(
        shapes.index_shape(z.shape, channel_first, ncb), device="meta")  # strides only

    def make(copy):
        zz = z.contiguous() if copy else z
        cc = torch.empty_like(zz) if copy else codes
        operands = [z_units(zz, channel_first, ncb, d), z_units(cc, channel_first, ncb, d),
                    index_units(dense_idx, channel_first, ncb)]
        if dither is not None:
            operands.append(_positions(z, channel_first, ncb, d))
        return operands[0][0], operands, zz.numel(), (zz, cc)

    geo, (zz, codes) = plan(make, d)
    dither_args, dither_cst = _dither_args(geo, dither, z.shape)
    with on_device(zz):  # the tensor's device, not the current one
        wrap(_fsq_fwd_kernel)[geo.grid](
            zz, codes, idx, usage, None if dither is None else dither.key_offset,  # None: unused (constexpr)
            geo.n_inner, geo.n_o1, geo.n_o2,
            *geo.operand(0), *geo.operand(1), *geo.operand(2, channel=False), *dither_args,
            LEVELS=levels, HALF_L=cst["HALF_L"], OFFSET=cst["OFFSET"], SHIFT=cst["SHIFT"], IN_SCALE=cst["IN_SCALE"],
            BASIS=cst["BASIS"], BOUNDS=cst["BOUNDS"], MAX_B=cst["MAX_B"],
            VARIANT=variant, HARD_CLAMP=bool(hard_clamp), USE_CMP=cst["USE_CMP"],
            WRITE_INDEX=bool(return_indices), INDEX_64=cst["INDEX_64"],
            STEPS=() if dither is None else tuple(dither.steps), USAGE=usage is not None,
            NUM_CODES=cst["NUM_CODES"], NCB=ncb, HIST_BINS=0 if usage is None else histogram_bins(usage.numel()),
            Z_IN_ONE=geo.flags[0][0], Z_IN_CONST=geo.flags[0][1], Z_C_ONE=geo.flags[0][2],
            C_IN_ONE=geo.flags[1][0], C_IN_CONST=geo.flags[1][1], C_C_ONE=geo.flags[1][2],
            I_IN_ONE=geo.flags[2][0],
            D=d, **dither_cst, **geo.common(), num_warps=4,
        )
    return codes, (idx if return_indices else None)


def fsq_backward(grad_codes: torch.Tensor, z: torch.Tensor, cst: dict, variant: int,
                 hard_clamp: bool, channel_first: bool, num_codebooks: int, wrap=_identity, *,
                 dither: DitherArgs | None = None):
    """grad_z (z.dtype, z's shape and memory format) from grad_codes and z in one pass; with
    `dither` (the forward's), the gradient of the dithered output, its words regenerated."""
    d, ncb = len(cst["LEVELS"]), int(num_codebooks)
    grad_z = torch.empty_like(z)
    if z.numel() == 0:
        return grad_z
    grad_codes = grad_codes.to(z.dtype)

    def make(copy):
        zz, gg = (z.contiguous(), grad_codes.contiguous()) if copy else (z, grad_codes)
        oo = torch.empty_like(zz) if copy else grad_z
        ops = [z_units(t, channel_first, ncb, d) for t in (zz, gg, oo)]
        if dither is not None:
            ops.append(_positions(z, channel_first, ncb, d))
        return ops[0][0], ops, zz.numel(), (zz, gg, oo)

    geo, (zz, gg, grad_z) = plan(make, d)
    zf, gf, of = geo.flags[:3]
    dither_args, dither_cst = _dither_args(geo, dither, z.shape)
    with on_device(zz):  # the tensor's device, not the current one
        wrap(_fsq_bwd_kernel)[geo.grid](
            zz, gg, grad_z, None if dither is None else dither.key_offset,
            geo.n_inner, geo.n_o1, geo.n_o2,
            *geo.operand(0), *geo.operand(1), *geo.operand(2), *dither_args,
            LEVELS=cst["LEVELS"], HALF_L=cst["HALF_L"], OFFSET=cst["OFFSET"], SHIFT=cst["SHIFT"],
            GRAD_SCALE=cst["GRAD_SCALE"], IN_SCALE=cst["IN_SCALE"], BOUNDS=cst["BOUNDS"], MAX_B=cst["MAX_B"],
            VARIANT=variant, HARD_CLAMP=bool(hard_clamp), USE_CMP=cst["USE_CMP"],
            Z_IN_ONE=zf[0], Z_IN_CONST=zf[1], Z_C_ONE=zf[2],
            G_IN_ONE=gf[0], G_IN_CONST=gf[1], G_C_ONE=gf[2],
            O_IN_ONE=of[0], O_IN_CONST=of[1], O_C_ONE=of[2],
            D=d, **dither_cst, **geo.common(), num_warps=4,
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
