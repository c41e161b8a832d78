"""iFSQ's numbers against its published formula, evaluated in mpmath (60 digits)."""

from __future__ import annotations

import mpmath
import pytest
import torch

from fsq_kernels import ifsq

ODD_LEVEL_SETS = [(3,), (5,), (7, 5, 5, 5), (9, 3), (15,), (255,)]
mp = mpmath.mp.clone()
mp.dps = 60


def published_bound(z, level: int):
    """(2 sigmoid(1.6 z) - 1) (L - 1)/2, the iFSQ code's simple_bound, 1.6 as the real 8/5."""
    return (2 / (1 + mp.exp(-mp.mpf(8) / 5 * mp.mpf(z))) - 1) * mp.mpf(level - 1) / 2


@pytest.mark.parametrize("level", sorted({lv for levels in ODD_LEVEL_SETS for lv in levels}))
def test_boundaries_are_where_the_published_bound_crosses_half_integers(level):
    boundaries = ifsq.level_boundaries(level)
    assert len(boundaries) == level - 1 and boundaries == sorted(boundaries)
    for q, t in zip(range(-(level // 2), level // 2), boundaries):
        # float64 t is within a few ulps of the real boundary: b(t) = q + 1/2 up to b'(t) * ulps
        slope = mp.diff(lambda x: published_bound(x, level), t)
        assert abs(published_bound(t, level) - (q + mp.mpf(1) / 2)) <= slope * 8 * abs(t) * 2**-52 + mp.mpf(2) ** -150
        below, above = published_bound(t * (1 - 1e-12) - 1e-300, level), published_bound(t * (1 + 1e-12) + 1e-300, level)
        lo, hi = (below, above) if t > 0 else (above, below)
        assert mp.nint(lo) == q and mp.nint(hi) == q + 1


@pytest.mark.parametrize("levels", ODD_LEVEL_SETS)
def test_bound_code_and_gradient_match_the_published_formula(levels):
    z = torch.randn(200, len(levels), dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    b = ifsq.bound(z, levels)
    k = torch.round(b) + torch.tensor([level // 2 for level in levels], dtype=torch.float64)
    codes = ifsq.code(k, levels)
    grads = ifsq.gradient(z, levels)
    for i in range(z.shape[0]):
        for c, level in enumerate(levels):
            x = float(z[i, c])
            exact = published_bound(x, level)
            assert abs(float(b[i, c]) - exact) <= 1e-13 * level
            q = int(mp.nint(exact))  # round-half-even, as torch.round (no real input is a tie)
            assert float(codes[i, c]) == pytest.approx(q / (level // 2), abs=0.0)
            slope = mp.diff(lambda v: published_bound(v, level), x) / (level // 2)
            assert float(grads[i, c]) == pytest.approx(float(slope), rel=1e-12, abs=1e-300)


def test_sigmoid_form_is_tanh_of_four_fifths():
    for x in (-3.7, -0.2, 0.0, 0.3, 5.0):
        assert abs((2 / (1 + mp.exp(-mp.mpf(8) / 5 * x)) - 1) - mp.tanh(mp.mpf(4) / 5 * x)) < mp.mpf(10) ** -55


@pytest.mark.parametrize("levels", [(4,), (5, 8), (2, 3)])
def test_even_levels_are_a_value_error(levels):
    with pytest.raises(ValueError, match="odd levels"):
        ifsq.check_levels(levels)
