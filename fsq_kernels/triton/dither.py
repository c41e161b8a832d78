"""The dither's device helpers (docs/dither.md), used inside the FSQ forward and backward kernels
(fsq.py, constexpr DITHER): the Philox words from Triton's own tl.randint4x at counter
offset + pos (pos = the element's row-major position in z's logical shape), the noise, the masks
and the clamp, and the gradient mask the backward regenerates from the same words.

Word assignment (docs/dither.md, "Which word is which"): at the element's own counter, w0 is the
noise (u0 - 1/2) and w1 the "peer" mask (u1 < p); at the counter of the first element of its
batch element, w2 and w3 are the "taae" masks (unquantized if u2 < p, kept if u3 < p).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import _lane_f32, _one_minus_tanh_abs, _tanh

NONE, PEER, TAAE = 0, 1, 2  # the ops' dither_mode; the kernels' DITHER constexpr


class DitherArgs(NamedTuple):
    """What a launcher needs to dither: mode (PEER or TAAE), p, the float32 grid step 2/(L-1) of
    each channel of one codebook, and the int64 [key, offset] tensor on z's device."""

    mode: int
    p: float
    steps: tuple
    key_offset: torch.Tensor


def per_batch_element(shape) -> int:
    """Elements per batch element (index along dim 0); a 1-D z is one batch element."""
    numel = 1
    for size in shape:
        numel *= size
    return max(1, numel // shape[0] if len(shape) >= 2 and shape[0] else numel)


@triton.jit
def _uniform(word):
    """Triton's uint32 -> [0, 1) float32 (tl.random.uint_to_uniform_float, spelled out)."""
    x = word.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _element_uniforms(key_offset_ptr, pos):
    """(u0, u1) at the element's counter offset + pos (pos int64)."""
    w0, w1, _, _ = tl.randint4x(tl.load(key_offset_ptr), tl.load(key_offset_ptr + 1) + pos)
    return _uniform(w0), _uniform(w1)


@triton.jit
def _batch_uniforms(key_offset_ptr, row_pos, per_batch):
    """(u2, u3) ([BLOCK, 1]) at the counter of the first element of each unit's batch element:
    the channels of a unit (token, codebook) share their batch element, so one draw per unit."""
    _, _, w2, w3 = tl.randint4x(tl.load(key_offset_ptr), tl.load(key_offset_ptr + 1) + (row_pos - row_pos % per_batch))
    return _uniform(w2)[:, None], _uniform(w3)[:, None]


@triton.jit
def _dither(code, z, pos, row_pos, lane, key_offset_ptr, per_batch, p, STEPS: tl.constexpr, MODE: tl.constexpr,
            D: tl.constexpr, D_PAD: tl.constexpr):
    """The dithered output (float32) of a [BLOCK, D_PAD] tile: `code` is the noiseless code as
    stored in the output dtype, z the input (float32), pos the elements' positions and row_pos
    their units' first positions (int64)."""
    u0, u1 = _element_uniforms(key_offset_ptr, pos)
    noise = u0 - 0.5
    if MODE == 1:
        x = code + noise
        x = tl.where(x < -1.0, -1.0, tl.where(x > 1.0, 1.0, x))  # NaN stays NaN, as torch.clamp
        out = tl.where(u1 < p, x, code)
    else:
        u2, u3 = _batch_uniforms(key_offset_ptr, row_pos, per_batch)
        t = _tanh(z)
        noisy = t + noise * _lane_f32(STEPS, lane, D, D_PAD, 0.0)[None, :]
        out = tl.where(u3 < p, tl.where(u2 < p, t, code), noisy)
    return out


@triton.jit
def _dither_grad(g, d, code, z, pos, row_pos, key_offset_ptr, per_batch, p, MODE: tl.constexpr):
    """grad_z of the dithered output from its gradient g and the straight-through factor d:
    peer: 0 where the element was noised and code + noise left [-1, 1] (torch.clamp's inclusive
    backward), else g * d; taae: g * d where the batch element took the quantized code, else
    g * sech^2(z) (the gradient of tanh)."""
    if MODE == 1:
        u0, u1 = _element_uniforms(key_offset_ptr, pos)
        x = code + (u0 - 0.5)
        inside = (x >= -1.0) & (x <= 1.0)
        gz = tl.where((u1 < p) & ~inside, 0.0, g) * d
    else:
        u2, u3 = _batch_uniforms(key_offset_ptr, row_pos, per_batch)
        u = _one_minus_tanh_abs(z)
        gz = g * tl.where((u3 < p) & (u2 >= p), d, u * (2.0 - u))
    return gz
