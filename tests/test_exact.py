"""The exact boundary sweep (docs/design.md, "Exact indices").

Truth is exact arithmetic (mpmath at 60 digits, with the float64 constants of
reference.channel_constants taken as exact numbers), never the float64 reference: for every
level boundary t of the Table-1 level sets and of small odd and even L, every variant with
hard_clamp where allowed, and float32, bfloat16 and float16, the inputs are the representable
neighbours of t (a few ulps each side, t itself where representable) plus subnormals and tiny
values around 0. Then

* k = #{z > t} (paper/atanh) or #{z >= t} (symmetric) holds for the reference, cpp and
  Triton (interpreter; its comparison path, max(levels) <= 32), and
* the backends agree with each other bit for bit, codes and indices.

Run as a script (`python tests/test_exact.py`) it prints the input and mismatch counts per backend.
"""

from __future__ import annotations

import bisect
import os
import sys

if __name__ == "__main__":  # Triton runs on CPU tensors in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mpmath
import pytest
import torch

from fsq_kernels import reference

ULPS = 4  # neighbours each side of a boundary
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TABLE1 = [(8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5), (8, 8, 8, 5, 5, 5)]
SMALL = [(2, 3, 4, 5, 7, 8), (4,), (32, 3)]
LARGE = [(300, 7)]  # the tanh path in Triton: reference and cpp only
VARIANT_CLAMPS = [("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True)]
# iFSQ (odd L only): its truth is the published formula itself, (2 sigmoid(1.6 z) - 1)(L-1)/2
# crossing q + 1/2, solved in mpmath with 1.6 the real 8/5 (not the float64 0.8 of the table)
IFSQ_LEVELS = [(7, 5, 5, 5, 5), (3, 5, 7, 9), (31, 3)]
IFSQ_LARGE = [(301, 7)]  # the tanh path in Triton
# tiny inputs on both sides of 0 (the symmetric even-L boundary is exactly 0)
TINY = [5e-17, 1e-17, 1e-30, 1e-38, 1e-40, 1e-42, 6e-8, 1e-5]

mpmath.mp.dps = 60


def exact_boundaries(levels, variant, hard_clamp):
    """Per channel, the real boundaries as mpf (+-inf where unreachable), ascending."""
    c = reference.channel_constants(levels, variant, hard_clamp)
    out = []
    for i, level in enumerate(levels):
        row = []
        if variant == "ifsq":  # sigma(1.6 t) = (1 + r)/2  <=>  t = log((1 + r)/(1 - r)) / 1.6
            for q in range(-(level // 2), level // 2):
                r = (q + mpmath.mpf(1) / 2) / (mpmath.mpf(level - 1) / 2)
                row.append(mpmath.log((1 + r) / (1 - r)) / (mpmath.mpf(8) / 5))
            out.append(row)
            continue
        for j in range(level - 1):
            if variant == "symmetric":
                target, shift = mpmath.mpf(2 * j + 1) / (level - 1) - 1, mpmath.mpf(0)
            else:
                h, o = mpmath.mpf(c["half_l"][i]), mpmath.mpf(c["offset"][i])
                target = (j - c["half_width"][i] + mpmath.mpf(0.5) + o) / h
                shift = mpmath.mpf(c["shift"][i])
            if hard_clamp:
                row.append(target - shift)
            elif target <= -1 or target >= 1:
                row.append(mpmath.mpf("-inf") if target <= -1 else mpmath.mpf("inf"))
            else:
                row.append(mpmath.atanh(target) - shift)
        out.append(row)
    return out


_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.bfloat16: (torch.int16, 0x7FFF),
         torch.float16: (torch.int16, 0x7FFF)}


def neighbours(values, dtype, ulps=ULPS):
    """The dtype values within `ulps` representable steps of each value (crossing 0 in order)."""
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    ity, mag_mask = _BITS[dtype]
    bits = x.view(ity).to(torch.int64)
    mag = bits & mag_mask
    ordered = torch.where(bits < 0, -mag, mag)  # monotone in the value
    steps = torch.arange(-ulps, ulps + 1)
    o = (ordered.unsqueeze(-1) + steps).flatten()
    sign_bit = mag_mask + 1
    raw = torch.where(o < 0, (-o) | sign_bit, o)
    raw = torch.where(raw >= sign_bit, raw - 2 * sign_bit, raw)  # back to the signed int type
    out = raw.to(ity).view(dtype)
    return out[torch.isfinite(out)]


def sweep_inputs(levels, variant, hard_clamp, dtype):
    """z (N, d) in dtype, each column the neighbours of its channel's boundaries and tiny values."""
    cols = []
    for row in exact_boundaries(levels, variant, hard_clamp):
        finite = [float(t) for t in row if mpmath.isfinite(t)]
        tiny = TINY + [-v for v in TINY] + [0.0]
        col = torch.cat([neighbours(finite, dtype), neighbours(tiny, dtype, 1)]) if finite else neighbours(tiny, dtype, 1)
        cols.append(torch.unique(col.float()).to(dtype))
    n = max(len(c) for c in cols)
    return torch.stack([c.repeat(n // len(c) + 1)[:n] for c in cols], dim=-1)


def truth(z, levels, variant, hard_clamp):
    """Exact indices: per channel bisect the input (an exact mpf) into the exact boundaries."""
    rows = exact_boundaries(levels, variant, hard_clamp)
    count = bisect.bisect_right if variant == "symmetric" else bisect.bisect_left  # >= vs >
    zz = z.double().tolist()
    ks = [[count(rows[i], mpmath.mpf(v)) for i, v in enumerate(token)] for token in zz]
    k = torch.tensor(ks, dtype=torch.int64)
    return (k * torch.tensor(reference.basis(levels))).sum(-1)


def backends(levels):
    """name -> quantize(z, levels, variant, hard_clamp) -> (codes, indices)."""
    out = {"reference": lambda z, v, hc: reference.quantize(z, levels, variant=v, hard_clamp=hc)}
    from fsq_kernels.ops import native

    if native.is_available("cpu"):
        out["cpp"] = lambda z, v, hc: native.quantize(z, tuple(levels), v, hc, False, 1, True)
    if os.environ.get("TRITON_INTERPRET") == "1" and max(levels) <= 32:
        try:
            from fsq_kernels.ops import triton as triton_backend
        except ImportError:
            return out
        if triton_backend.is_available("cpu"):
            out["triton"] = lambda z, v, hc: triton_backend.quantize(z, tuple(levels), v, hc, False, 1, True)
    return out


def sweep(levels, variant, hard_clamp, dtype):
    """(inputs, {backend: indices mismatches vs truth}, {backend: bitwise differences vs the reference})."""
    z = sweep_inputs(levels, variant, hard_clamp, dtype)
    want = truth(z, levels, variant, hard_clamp)
    results = {name: fn(z, variant, hard_clamp) for name, fn in backends(levels).items()}
    wrong = {name: int((idx.to(torch.int64) != want).sum()) for name, (_, idx) in results.items()}
    ref_codes, ref_idx = results["reference"]
    differ = {name: int(((codes.view(torch.int16 if dtype != torch.float32 else torch.int32)
                          != ref_codes.view(torch.int16 if dtype != torch.float32 else torch.int32)).any(-1)
                         | (idx != ref_idx)).sum())
              for name, (codes, idx) in results.items() if name != "reference"}
    return z.shape[0], wrong, differ


CASES = [(lv, v, hc) for lv in TABLE1 + SMALL + LARGE for v, hc in VARIANT_CLAMPS]
CASES += [(lv, "ifsq", False) for lv in IFSQ_LEVELS + IFSQ_LARGE]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels,variant,hard_clamp", CASES, ids=str)
def test_exact_at_every_boundary(levels, variant, hard_clamp, dtype):
    n, wrong, differ = sweep(levels, variant, hard_clamp, dtype)
    assert n > 0
    assert all(v == 0 for v in wrong.values()), f"{n} inputs, mismatches with exact arithmetic: {wrong}"
    assert all(v == 0 for v in differ.values()), f"{n} inputs, bitwise differences from the reference: {differ}"


def test_sweep_inputs_cover_both_sides():
    """The sweep must be able to fail: its inputs straddle every boundary and 0."""
    levels = (4,)
    z = sweep_inputs(levels, "symmetric", False, torch.bfloat16)
    k = truth(z, levels, "symmetric", False)
    assert set(k.tolist()) == {0, 1, 2, 3}
    zero_side = z[(z.float().abs() < 1e-30).squeeze(-1)].float()
    assert (zero_side < 0).any() and (zero_side > 0).any() and (zero_side == 0).any()
    assert (z.float().abs() < 1.2e-38).any()  # bfloat16 subnormals
    # a backend off by one at the boundary 0 would be caught
    assert int((truth(torch.tensor([[-1e-40]]), levels, "symmetric", False) != 1).sum()) == 0


if __name__ == "__main__":
    totals, total_n = {}, 0
    for levels, variant, hard_clamp in CASES:
        for dtype in DTYPES:
            n, wrong, differ = sweep(levels, variant, hard_clamp, dtype)
            total_n += n
            for name, v in wrong.items():
                totals[name] = totals.get(name, 0) + v
            for name, v in differ.items():
                totals[name + " vs reference (bitwise)"] = totals.get(name + " vs reference (bitwise)", 0) + v
            if any(wrong.values()):
                print(levels, variant, hard_clamp, dtype, n, wrong, differ, file=sys.stderr)
    print(f"{total_n} inputs; mismatches: {totals}")
