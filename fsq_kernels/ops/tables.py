"""The per-level-set tables every fused kernel consumes: one place, built from the reference.

A table is a flat tuple of Python floats, for one (levels, variant, hard_clamp, math dtype)
(math dtype: float64 for float64 inputs, float32 for float32, bfloat16 and float16 ones):

    per channel i, FIELDS values:  k0, nb, shift, grad_coef, code_mul, code_sub, code_den,
                                   half_l, offset, input_scale
    then the nb_0 + nb_1 + ... finite comparison boundaries, channel after channel, ascending

* k0 / boundaries: reference.comparison_boundaries. k = k0 + #{x > t} (paper/atanh) or
  k = #{x >= t} (symmetric); each float32 boundary is the real one rounded in the direction its
  comparison needs, so the comparison is exact for every float32/bfloat16/float16 input.
* shift, half_l, offset: reference.channel_constants (symmetric: 0, (L-1)/2, 0).
* grad_coef, input_scale: dcode/dz = grad_coef * sech^2(input_scale * z + shift), so grad_coef =
  input_scale * half_l / (L // 2) (paper/atanh/ifsq) or 1 (symmetric); input_scale is 0.8 for
  ifsq (tanh(0.8 z)) and 1 otherwise.
* code = (code_mul * k - code_sub) / code_den: (k - L//2) / (L//2) or (2k - (L-1)) / (L-1).
Floating values are rounded to nearest in the math dtype (exact in the list of Python floats).

The residual table is the symmetric table followed by the num_stages x d stage scales of
reference.residual_scales.

Consumers: the C++ ops take the table as a `float[]` argument (csrc/fsq_common.h parses it; the
CUDA side caches a device copy per device and contents when it does not fit in the kernel
arguments); the Triton launchers turn it into their constexprs (fsq_kernels/triton/fsq.py).
The builders are cached, and the public entry points are marked
torch.compiler.assume_constant_result: torch.compile and torch.export call them eagerly and put
the table into the graph as a constant, so an exported program carries its tables with it.
"""

from __future__ import annotations

import functools
import struct

import torch

from .. import reference

FIELDS = ("k0", "nb", "shift", "grad_coef", "code_mul", "code_sub", "code_den", "half_l", "offset", "input_scale")
NUM_FIELDS = len(FIELDS)

__all__ = ["FIELDS", "NUM_FIELDS", "math_dtype", "quantize_table", "residual_table", "round_to", "split"]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_to(x: float, dtype: torch.dtype) -> float:
    """x rounded to nearest in the math dtype of `dtype` (as a Python float)."""
    x = float(x)
    return x if dtype == torch.float64 else struct.unpack("<f", struct.pack("<f", x))[0]


@functools.cache
def _quantize_table(levels: tuple, variant: str, hard_clamp: bool, dtype: torch.dtype) -> tuple:
    consts = reference.channel_constants(levels, variant, hard_clamp)
    k0, rows = reference.comparison_boundaries(levels, variant, hard_clamp, dtype)
    header = []
    for i, level in enumerate(levels):
        hw = consts["half_width"][i]
        if variant == "symmetric":
            shift, coef, mul, sub, den = 0.0, 1.0, 2, level - 1, level - 1
        else:
            scale = consts["input_scale"][i]
            shift, coef, mul, sub, den = consts["shift"][i], scale * consts["half_l"][i] / hw, 1, hw, hw
        header += [float(k0[i]), float(len(rows[i])), round_to(shift, dtype), round_to(coef, dtype), float(mul),
                   float(sub), float(den), round_to(consts["half_l"][i], dtype), round_to(consts["offset"][i], dtype),
                   round_to(consts["input_scale"][i], dtype)]
    return tuple(header) + tuple(t for row in rows for t in row)


@functools.cache
def _residual_table(levels: tuple, num_stages: int, hard_clamp: bool, dtype: torch.dtype) -> tuple:
    scales = tuple(round_to(v, dtype) for row in reference.residual_scales(levels, num_stages) for v in row)
    return _quantize_table(levels, "symmetric", hard_clamp, dtype) + scales


@torch.compiler.assume_constant_result
def quantize_table(levels: tuple, variant: str, hard_clamp: bool, dtype: torch.dtype) -> list:
    """The table of quantize (and its backward and decode) for inputs of `dtype`."""
    return list(_quantize_table(tuple(levels), variant, bool(hard_clamp), math_dtype(dtype)))


@torch.compiler.assume_constant_result
def residual_table(levels: tuple, num_stages: int, hard_clamp: bool, dtype: torch.dtype) -> list:
    """The table of residual_quantize (symmetric stages, then the stage scales)."""
    return list(_residual_table(tuple(levels), int(num_stages), bool(hard_clamp), math_dtype(dtype)))


def split(table, d: int) -> tuple[dict, list[list[float]], list[float]]:
    """(per-field lists, boundary rows, the values after the boundaries: residual scales)."""
    fields = {name: [table[i * NUM_FIELDS + f] for i in range(d)] for f, name in enumerate(FIELDS)}
    rows, at = [], d * NUM_FIELDS
    for nb in fields["nb"]:
        rows.append(list(table[at:at + int(nb)]))
        at += int(nb)
    return fields, rows, list(table[at:])
