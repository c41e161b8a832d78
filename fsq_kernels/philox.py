"""Philox4x32-10 in PyTorch: the one counter-based generator every backend's dither uses.

Exact: uint32 words are held in int64 tensors and every product is split so that nothing
overflows, so this file reproduces, bit for bit, Random123's philox4x32_10, Triton's
`tl.randint4x` / `tl.rand` and csrc/fsq_philox.h (docs/dither.md).

Conventions (Triton's, tl.randint4x(seed, offset)):
  key (a 64-bit integer)     -> k0 = low 32 bits, k1 = high 32 bits
  counter (a 64-bit integer) -> c0 = low 32 bits, c1 = high 32 bits, c2 = c3 = 0
  uint32 -> float32 in [0, 1): x read as int32, x = ~x where negative, then
                               float32(x) * float32(4.6566127342e-10) (two roundings to nearest)
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53  # Philox multiplier of words 0 -> 3
ROUND_B = 0xCD9E8D57  # Philox multiplier of words 2 -> 1
KEY_A = 0x9E3779B9  # Weyl increments of k0, k1
KEY_B = 0xBB67AE85
ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest float32 with (2^31 - 1) * scale < 1

__all__ = ["philox4x32", "randint4x", "uint32_to_uniform", "uniform4x", "split_key"]


def _mulhilo(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of multiplier * x for uint32 x held in int64, exactly."""
    m_hi, m_lo = multiplier >> 16, multiplier & 0xFFFF
    p_lo = x * m_lo  # < 2^48
    p_hi = x * m_hi  # < 2^48; multiplier * x = p_hi * 2^16 + p_lo
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return high, low


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0, k1, rounds: int = ROUNDS):
    """Philox4x32 with `rounds` rounds of counter (c0..c3) under key (k0, k1), all uint32 values
    in int64 tensors (or Python ints for the key); returns the four output words the same way."""
    k0 = torch.as_tensor(k0, dtype=torch.int64, device=c0.device) & MASK32
    k1 = torch.as_tensor(k1, dtype=torch.int64, device=c0.device) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def split_key(key: Tensor | int) -> tuple[Tensor, Tensor]:
    """A 64-bit key (int64 two's complement, a 0-d tensor or int) as (k0, k1) = (low, high)."""
    key = torch.as_tensor(key, dtype=torch.int64)
    return key & MASK32, (key >> 32) & MASK32


def randint4x(key: Tensor | int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton's tl.randint4x(key, counter): four uint32 words (in int64) per 64-bit counter."""
    counter = counter.to(torch.int64)
    k0, k1 = split_key(key)
    zero = torch.zeros_like(counter)
    return philox4x32(counter & MASK32, (counter >> 32) & MASK32, zero, zero, k0.to(counter.device),
                      k1.to(counter.device))


def uint32_to_uniform(x: Tensor) -> Tensor:
    """Triton's uint_to_uniform_float for uint32 words: float32 in [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def uniform4x(key: Tensor | int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton's tl.rand4x(key, counter): four float32 uniforms in [0, 1) per counter."""
    return tuple(uint32_to_uniform(w) for w in randint4x(key, counter))
