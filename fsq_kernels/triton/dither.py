"""Triton kernels of the fused dither (docs/dither.md) and their launchers.

One elementwise pass over the noiseless codes (and z for the "taae" form): the Philox words are
Triton's own tl.randint4x at counter offset + i (i = the element's row-major position), the
masks, the noise, the clamp and the store in one kernel; the backward regenerates the same words.
Inputs are read in their logical (row-major) order: the launchers pass contiguous tensors (a
no-op for the quantize kernels' outputs and for contiguous z).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _cast_out, _one_minus_tanh_abs, _tanh

PEER, TAAE = 0, 1
MODES = {"peer": PEER, "taae": TAAE}
BLOCK = 1024


@triton.jit
def _uniform(word):
    """Triton's uint32 -> [0, 1) float32 (tl.random.uint_to_uniform_float, spelled out)."""
    x = word.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _words(key_offset_ptr, i, per_batch, MODE: tl.constexpr):
    """(u0, u1, u2, u3): the element's noise and mask uniforms and (taae) its batch element's."""
    key = tl.load(key_offset_ptr)
    offset = tl.load(key_offset_ptr + 1)
    w0, w1, _, _ = tl.randint4x(key, offset + i)
    u2 = tl.zeros_like(i).to(tl.float32)
    u3 = u2
    if MODE == 1:
        _, _, w2, w3 = tl.randint4x(key, offset + (i // per_batch) * per_batch)
        u2 = _uniform(w2)
        u3 = _uniform(w3)
    return _uniform(w0), _uniform(w1), u2, u3


@triton.jit
def _step(i, inner, channels, STEPS: tl.constexpr, D: tl.constexpr):
    """2/(L-1) (float32) of each element's channel."""
    lane = (i // inner) % channels % D
    step = tl.zeros_like(i).to(tl.float32)
    for j in tl.static_range(D):
        step = tl.where(lane == j, STEPS[j], step)
    return step


@triton.jit
def _dither_fwd_kernel(codes_ptr, z_ptr, out_ptr, key_offset_ptr, n, per_batch, inner, channels, p,
                       STEPS: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < n
    u0, u1, u2, u3 = _words(key_offset_ptr, i, per_batch, MODE)
    c = tl.load(codes_ptr + i, mask=mask, other=0.0).to(tl.float32)
    noise = u0 - 0.5
    if MODE == 0:
        x = c + noise
        x = tl.where(x < -1.0, -1.0, tl.where(x > 1.0, 1.0, x))  # NaN stays NaN, as torch.clamp
        out = tl.where(u1 < p, x, c)
    else:
        t = _tanh(tl.load(z_ptr + i, mask=mask, other=0.0).to(tl.float32))
        noisy = t + noise * _step(i, inner, channels, STEPS, D)
        out = tl.where(u3 < p, tl.where(u2 < p, t, c), noisy)
    tl.store(out_ptr + i, _cast_out(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dither_bwd_kernel(grad_ptr, codes_ptr, z_ptr, grad_codes_ptr, grad_z_ptr, key_offset_ptr, n, per_batch, p,
                       MODE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < n
    u0, u1, u2, u3 = _words(key_offset_ptr, i, per_batch, MODE)
    g = tl.load(grad_ptr + i, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        x = tl.load(codes_ptr + i, mask=mask, other=0.0).to(tl.float32) + (u0 - 0.5)
        inside = (x >= -1.0) & (x <= 1.0)
        tl.store(grad_codes_ptr + i, tl.where((u1 >= p) | inside, g, 0.0).to(grad_codes_ptr.dtype.element_ty),
                 mask=mask)
    else:
        quantized = (u3 < p) & (u2 >= p)
        u = _one_minus_tanh_abs(tl.load(z_ptr + i, mask=mask, other=0.0).to(tl.float32))
        sech2 = u * (2.0 - u)
        tl.store(grad_codes_ptr + i, tl.where(quantized, g, 0.0).to(grad_codes_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_z_ptr + i, tl.where(quantized, 0.0, g * sech2).to(grad_z_ptr.dtype.element_ty), mask=mask)


def _identity(kernel):
    return kernel


def geometry(shape, channel_first: bool) -> tuple[int, int, int, int]:
    """(numel, elements per batch element, inner stride of the channel axis, channels)."""
    numel = 1
    for size in shape:
        numel *= size
    batch = shape[0] if len(shape) >= 2 else 1
    channels = shape[1] if channel_first else shape[-1]
    inner = numel // max(1, batch * channels) if channel_first else 1
    return numel, numel // max(1, batch), max(1, inner), max(1, channels)


def dither_forward(codes: torch.Tensor, z: torch.Tensor, key_offset: torch.Tensor, steps: tuple, mode: int, p: float,
                   channel_first: bool, wrap=_identity) -> torch.Tensor:
    codes, z = codes.contiguous(), z.contiguous()
    out = torch.empty_like(codes)
    n, per_batch, inner, channels = geometry(z.shape, channel_first)
    if n:
        wrap(_dither_fwd_kernel)[(triton.cdiv(n, BLOCK),)](
            codes, z, out, key_offset, n, per_batch, inner, channels, float(p),
            STEPS=tuple(steps), D=len(steps), MODE=mode, BLOCK=BLOCK,
        )
    return out


def dither_backward(grad: torch.Tensor, codes: torch.Tensor, z: torch.Tensor, key_offset: torch.Tensor, mode: int,
                    p: float, channel_first: bool, wrap=_identity) -> tuple[torch.Tensor, torch.Tensor]:
    grad, codes, z = grad.contiguous(), codes.contiguous(), z.contiguous()
    grad_codes = torch.empty_like(codes)
    grad_z = torch.empty_like(z) if mode == TAAE else z.new_empty((0,))
    n, per_batch, _, _ = geometry(z.shape, channel_first)
    if n:
        wrap(_dither_bwd_kernel)[(triton.cdiv(n, BLOCK),)](
            grad, codes, z, grad_codes, grad_z, key_offset, n, per_batch, float(p), MODE=mode, BLOCK=BLOCK,
        )
    return grad_codes, grad_z
