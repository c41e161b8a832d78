"""Exact arithmetic behind the reference's comparison boundaries (reference.comparison_boundaries):
float32 neighbours, and the sign of (real boundary - float) decided with Fractions or 200-digit
Decimals. Plain Python (struct, fractions, decimal): it runs eagerly, also when torch.compile or
torch.export meets a table for the first time (the callers are assume_constant_result).
"""

from __future__ import annotations

import contextlib
import functools
import struct
from decimal import Decimal, localcontext
from fractions import Fraction

import torch

__all__ = ["f32", "next_f32", "round_boundary_f32", "sign_of_boundary_minus"]


def f32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def next_f32(f: float, up: bool) -> float:
    """The float32 neighbour of float32 f above (up) or below."""
    if f == 0.0:
        return struct.unpack("<f", struct.pack("<i", 1))[0] * (1 if up else -1)
    bits = struct.unpack("<i", struct.pack("<f", f))[0]
    bits += 1 if (f > 0) == up else -1
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def sign_of_boundary_minus(f: float, *, level: int, j: int, variant: str, hard_clamp: bool, consts: dict, i: int) -> int:
    """sign(t - f) for the real-valued boundary t of channel i, step j, in exact arithmetic.

    t is defined by the float64 constants of channel_constants taken as exact numbers. Hard-clamped
    boundaries are rational (Fraction). Otherwise t - f has the sign of
    target - tanh(input_scale * f + shift) (input_scale > 0: 0.8 for ifsq, else 1),
    the target a rational in (-1, 1); tanh of a non-zero rational is irrational, so 200 digits
    decide every case but tanh(0) = 0, which is exact."""
    if variant == "symmetric":
        target, shift = Fraction(2 * j + 1, level - 1) - 1, Fraction(0)
    else:
        h, o = Fraction(consts["half_l"][i]), Fraction(consts["offset"][i])
        target = (j - consts["half_width"][i] + Fraction(1, 2) + o) / h
        shift = Fraction(consts["shift"][i])
    if hard_clamp:
        diff = target - shift - Fraction(f)
        return (diff > 0) - (diff < 0)
    u = Fraction(f) * Fraction(consts["input_scale"][i]) + shift
    if u == 0:
        return (target > 0) - (target < 0)
    with localcontext() as ctx:
        ctx.prec = 200
        e = (2 * Decimal(u.numerator) / Decimal(u.denominator)).exp()
        tanh_u = (e - 1) / (e + 1)
        diff = Decimal(target.numerator) / Decimal(target.denominator) - tanh_u
    return (diff > 0) - (diff < 0)




@contextlib.contextmanager
def ieee_subnormals():
    """float32 subnormals are part of the exact answer, and struct's float32 conversions run on
    the FPU: under flush-to-zero (torch.set_flush_denormal(True), which the training commands
    set) the smallest subnormal would read as 0 and the neighbour search below would never end.
    Turn flushing off for the duration, and back on if it was on."""
    flushing = struct.unpack("<f", struct.pack("<i", 1))[0] == 0.0
    if flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(True)


def _with_ieee_subnormals(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ieee_subnormals():
            return fn(*args, **kwargs)
    return wrapper


@_with_ieee_subnormals
def round_boundary_f32(t: float, target: float, shift: float, hard_clamp: bool, up: bool, sign,
                       input_scale: float = 1.0) -> float:
    """The real boundary t (float64 approximation `t` = atanh(target) - shift, or target - shift
    with hard_clamp) rounded to float32 down (up=False) or up, exactly: sign(f) is sign(t - f).

    Where no float32 lies within the float64 error of `t` (nearly always), `t` rounds like the
    real t; otherwise the exact sign decides."""
    slope = 1.0 if hard_clamp else 1.0 / max(1e-300, 1.0 - target * target)  # atanh' amplifies
    err = 2.0**-48 * (abs(t) + (abs(shift) + abs(target) * slope) / input_scale) + 1e-300
    f = f32(t)
    if abs(t - f) > err:
        down = f if f < t else next_f32(f, up=False)
        return next_f32(down, up=True) if up else down
    down = f
    while sign(down) < 0:
        down = next_f32(down, up=False)
    while sign(next_f32(down, up=True)) >= 0:
        down = next_f32(down, up=True)
    return next_f32(down, up=True) if up and sign(down) != 0 else down
