"""Dithered FSQ: the reference of the noise every fused backend draws in its kernel (docs/dither.md).

Two forms, both on the `symmetric` grid, both only in training:

* "peer" (vector-quantize-pytorch's FSQ(noise_dropout=p)): each element, with probability p,
  becomes clamp(code + U(-1/2, 1/2), -1, 1); the others keep their code.
* "taae" (stable-audio-tools' DitheredFSQ, arXiv 2411.19842): per batch element (index along
  dim 0), with probability 1 - p every element is tanh(z) + U(-1/2, 1/2) * 2/(L-1); with p^2 it
  is the unquantized tanh(z); with p(1 - p) the hard-quantized code.

The random numbers: Philox4x32-10 (fsq_kernels/philox.py) under a 64-bit key, at counter
offset + i for the element at row-major position i of z's logical shape. Its words w0..w3:
  w0 -> the element's noise u - 1/2,  w1 -> the element's mask (u < p, "peer"),
  w2, w3 at the counter of the first element of batch element b -> b's masks ("taae":
  unquantized if u2 < p, kept if u3 < p).
u is Triton's uint32 -> float32 conversion; p is compared as a float32. Key and offset are one
int64 tensor [key, offset] on z's device, drawn from the device's torch generator by
`draw_key_offset` (no host sync); the same key and offset give the same noise, bit for bit, on
every backend.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import philox
from .exact import f32

MODES = ("peer", "taae")

__all__ = ["MODES", "apply", "draw_key_offset", "element_uniforms", "mode_id", "steps"]


def draw_key_offset(device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """[key, offset] (int64, on `device`) drawn from the device's torch generator: one randint on
    the device, so CUDA needs no host sync, CUDA graphs replay it, and torch.manual_seed (or the
    generator's seed) reproduces a run."""
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)


def element_uniforms(shape: Sequence[int], key_offset: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """u0..u3 (float32, `shape`) of every element, counter = offset + row-major position."""
    numel = 1
    for size in shape:
        numel *= size
    counter = torch.arange(numel, dtype=torch.int64, device=key_offset.device) + key_offset[1]
    return tuple(u.view(tuple(shape)) for u in philox.uniform4x(key_offset[0], counter))


def _batch_uniforms(shape: Sequence[int], key_offset: Tensor) -> tuple[Tensor, Tensor]:
    """(u2, u3) at the counter of each element's batch element's first element, broadcast to shape."""
    batch = shape[0] if len(shape) >= 2 else 1
    per_batch = 1
    for size in shape[1 if len(shape) >= 2 else 0:]:
        per_batch *= size
    counter = torch.arange(batch, dtype=torch.int64, device=key_offset.device) * per_batch + key_offset[1]
    _, _, u2, u3 = philox.uniform4x(key_offset[0], counter)
    view = (batch,) + (1,) * (len(shape) - 1) if len(shape) >= 2 else (1,) * len(shape)
    return u2.view(view).expand(tuple(shape)), u3.view(view).expand(tuple(shape))


def mode_id(mode: str | None) -> int:
    """The fused ops' dither_mode: 0 for None (no dither), 1 for "peer", 2 for "taae"."""
    return 0 if mode is None else MODES.index(mode) + 1


def steps(levels: Sequence[int]) -> tuple[float, ...]:
    """The grid step 2/(L-1) of each channel, rounded to float32 (as TAAE's float32 half_l); plain
    Python, so it allocates nothing and torch.compile evaluates it while tracing."""
    return tuple(f32(2.0 / (level - 1)) for level in levels)


def _channel_steps(levels: Sequence[int], z: Tensor, channel_first: bool) -> Tensor:
    """steps(levels) broadcast over z's layout (num_codebooks repeats the levels)."""
    channels = z.shape[1 if channel_first else -1]
    row = torch.tensor(steps(levels) * (channels // len(levels)), dtype=torch.float32, device=z.device)
    return row.view((channels,) + (1,) * (z.dim() - 2)) if channel_first else row


def apply(codes: Tensor, z: Tensor, levels: Sequence[int], mode: str, p: float, key_offset: Tensor,
          channel_first: bool = False) -> Tensor:
    """The dithered output from the noiseless codes (z's layout, differentiable through codes and
    z). Arithmetic: noise and masks in float32, the sums in the math dtype of z, then z's dtype."""
    math_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    p32 = torch.tensor(p, dtype=torch.float32)
    u0, u1, _, _ = element_uniforms(z.shape, key_offset)
    noise = u0 - 0.5  # float32
    c = codes.to(math_dtype)
    if mode == "peer":
        noisy = (c + noise.to(math_dtype)).clamp(-1.0, 1.0)
        out = torch.where(u1 < p32, noisy, c)
    elif mode == "taae":
        step = _channel_steps(levels, z, channel_first)
        t = torch.tanh(z.to(math_dtype))
        unquantized, kept = (u < p32 for u in _batch_uniforms(z.shape, key_offset))
        out = torch.where(kept, torch.where(unquantized, t, c), t + (noise * step).to(math_dtype))
    else:
        raise ValueError(f"dither: mode must be one of {list(MODES)}; got {mode!r}")
    return out.to(z.dtype)
