"""iFSQ (arXiv 2601.17124): the per-level-set numbers of its bound, ready for the tables.

Its published code (Tencent-Hunyuan/iFSQ at e78bd70, ifsq/src/model/modules/fsq.py,
`simple_bound` with act_fun "scale_sigmoid_16") is

    b = (2 sigmoid(1.6 z) - 1) (L - 1)/2 = tanh(0.8 z) (L - 1)/2     (no eps, no shift)
    q = round-half-even(b),  code = q / (L // 2),  index digit k = q + L // 2

with an assert that every L is odd (even L: a ValueError here). Its gradient is the
straight-through one, dcode/dz = 0.8 sech^2(0.8 z) (L - 1)/2 / (L // 2) = 0.8 sech^2(0.8 z) for
odd L, and the level index steps up at t_q = atanh((q + 1/2) / ((L - 1)/2)) / 0.8,
q = -(L//2) .. L//2 - 1. No t_q is a float (atanh of a non-zero rational is irrational), so no
input is a tie and the direction of a comparison at a boundary never matters.
The 0.8 is the real number 4/5: the exact comparisons decide against that, not against the
float64 nearest to it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch
from torch import Tensor

INPUT_SCALE = Fraction(4, 5)  # the 1.6 of 2 sigmoid(1.6 z) - 1 = tanh(0.8 z), halved

__all__ = ["INPUT_SCALE", "bound", "check_levels", "code", "gradient", "level_boundaries"]


def check_levels(levels: Sequence[int], caller: str = "ifsq") -> None:
    """ValueError naming the first even level (iFSQ's bound has no offset for even L)."""
    for i, level in enumerate(levels):
        if level % 2 == 0:
            raise ValueError(f"{caller}: variant 'ifsq' needs odd levels; got levels[{i}] = {level}")


def half_l(level: int) -> float:
    return (level - 1) / 2


def level_boundaries(level: int) -> list[float]:
    """The L - 1 values of z where the level index steps up (float64, ascending)."""
    h = half_l(level)
    return [math.atanh((q + 0.5) / h) / float(INPUT_SCALE) for q in range(-(level // 2), level // 2)]


def bound(z: Tensor, levels: Sequence[int]) -> Tensor:
    """b = tanh(0.8 z) (L - 1)/2, channel-last z (..., d), in z's dtype (differentiable)."""
    h = torch.tensor([half_l(level) for level in levels], dtype=z.dtype, device=z.device)
    return torch.tanh(z * float(INPUT_SCALE)) * h


def code(k: Tensor, levels: Sequence[int]) -> Tensor:
    """Level index k (..., d) -> code (k - L//2) / (L//2)."""
    hw = torch.tensor([level // 2 for level in levels], dtype=k.dtype, device=k.device)
    return (k - hw) / hw


def gradient(z: Tensor, levels: Sequence[int]) -> Tensor:
    """dcode/dz = 0.8 sech^2(0.8 z) (L - 1)/2 / (L // 2) per element of channel-last z."""
    scale = torch.tensor([float(INPUT_SCALE) * half_l(level) / (level // 2) for level in levels],
                         dtype=z.dtype, device=z.device)
    return scale / torch.cosh(z * float(INPUT_SCALE)) ** 2
