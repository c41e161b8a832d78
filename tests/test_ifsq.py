"""iFSQ (variant "ifsq", arXiv 2601.17124) against its published formula, evaluated in mpmath.

The published code (Tencent-Hunyuan/iFSQ at e78bd70, ifsq/src/model/modules/fsq.py,
`simple_bound` with act_fun "scale_sigmoid_16"): b = (2 sigmoid(1.6 z) - 1)(L-1)/2, no eps, no
shift, odd L asserted; q = round(b) (half-to-even); code = q / (L // 2); the straight-through
gradient 0.8 sech^2(0.8 z). The exact boundary sweep (tests/test_exact.py) covers the boundaries
on every backend; this file covers the constants, codes, gradients, layouts and errors.
"""

from __future__ import annotations

import mpmath
import pytest
import torch

import fsq_kernels
from fsq_kernels import ops, reference
from fsq_kernels.ops import backends

from .conftest import TEST_DEVICE

ODD_LEVEL_SETS = [(3,), (7, 5, 5, 5), (9, 3), (15,), (301, 7)]
mp = mpmath.mp.clone()
mp.dps = 60
BACKENDS = ["reference"] + [name for name in ("cpp", "cuda", "triton")
                            if name in ops.available_backends() and backends.runs_on(name, TEST_DEVICE)]


def published_bound(z, level: int):
    """(2 sigmoid(1.6 z) - 1) (L - 1)/2, the iFSQ code's simple_bound, 1.6 as the real 8/5."""
    return (2 / (1 + mp.exp(-mp.mpf(8) / 5 * mp.mpf(z))) - 1) * mp.mpf(level - 1) / 2


def published_gradient(z, level: int):
    """d(round_ste(b) / (L // 2))/dz = b'(z) / (L // 2)."""
    return mp.diff(lambda v: published_bound(v, level), mp.mpf(z)) / (level // 2)


@pytest.mark.parametrize("level", [3, 5, 7, 9, 15, 301])
def test_boundaries_are_where_the_published_bound_crosses_half_integers(level):
    (boundaries,) = reference.level_boundaries((level,), "ifsq")
    assert len(boundaries) == level - 1 and boundaries == sorted(boundaries)
    for q, t in zip(range(-(level // 2), level // 2), boundaries):
        slope = mp.diff(lambda x: published_bound(x, level), t)
        assert abs(published_bound(t, level) - (q + mp.mpf(1) / 2)) <= slope * 8 * abs(t) * 2**-52
        step = abs(t) * 1e-12 + 1e-300
        assert mp.nint(published_bound(t - step, level)) == q and mp.nint(published_bound(t + step, level)) == q + 1


def test_constants_have_no_eps_and_no_shift():
    c = reference.channel_constants((7, 5), "ifsq")
    assert c["half_l"] == [3.0, 2.0] and c["offset"] == [0.0, 0.0] and c["shift"] == [0.0, 0.0]
    assert c["input_scale"] == [0.8, 0.8]
    assert abs((2 / (1 + mp.exp(-mp.mpf(8) / 5 * 1.3)) - 1) - mp.tanh(mp.mpf(4) / 5 * 1.3)) < mp.mpf(10) ** -55


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", ODD_LEVEL_SETS, ids=str)
def test_codes_and_gradient_match_the_published_formula(backend, levels):
    if backend == "triton" and max(levels) > 32:
        pytest.skip("Triton's tanh path is checked within the window in test_triton_tanh_path")
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(64, len(levels), generator=gen) * 2).to(TEST_DEVICE).requires_grad_()
    codes, indices = fsq_kernels.quantize(z, levels, variant="ifsq", backend=backend)
    grad = torch.randn(z.shape, generator=gen).to(TEST_DEVICE)
    codes.backward(grad)
    codes = codes.detach()
    basis = reference.basis(levels)
    values = z.detach()
    for i in range(z.shape[0]):
        index = 0
        for c, level in enumerate(levels):
            x = float(values[i, c])
            q = int(mp.nint(published_bound(x, level)))  # no float input is a tie
            assert float(codes[i, c]) == torch.tensor(q / (level // 2), dtype=torch.float32).item()
            index += (q + level // 2) * basis[c]
            want = float(published_gradient(x, level)) * float(grad[i, c])
            assert float(z.grad[i, c]) == pytest.approx(want, rel=1e-5, abs=1e-7)  # float32 sech^2
        assert int(indices[i]) == index


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_dtypes_agree_with_the_reference(backend):
    levels = (7, 5, 3)
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(4, 6, 5, generator=gen) * 2).to(dtype).to(TEST_DEVICE)  # channel-first, 2 codebooks
        want = fsq_kernels.quantize(z, levels, variant="ifsq", channel_first=True, num_codebooks=2, backend="reference")
        got = fsq_kernels.quantize(z, levels, variant="ifsq", channel_first=True, num_codebooks=2, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        decoded = fsq_kernels.indices_to_codes(got[1], levels, variant="ifsq", channel_first=True, num_codebooks=2,
                                               dtype=dtype, backend=backend)
        assert torch.equal(decoded, want[0])


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not available")
def test_triton_tanh_path():
    """max(levels) > 32: Triton evaluates tanh(0.8 z) in float32 (README "How exact is exact?")."""
    levels = (301, 7)
    z = (torch.randn(500, 2, generator=torch.Generator().manual_seed(2)) * 2).to(TEST_DEVICE).requires_grad_()
    codes, indices = fsq_kernels.quantize(z, levels, variant="ifsq", backend="triton")
    ref_codes, ref_indices = fsq_kernels.quantize(z, levels, variant="ifsq", backend="reference")
    far = (reference.distance_to_rounding_boundary(z, levels, "ifsq") > 1e-5 * 150).all(-1).cpu()
    assert far.float().mean() > 0.9
    assert torch.equal(indices.cpu()[far], ref_indices.cpu()[far])
    codes.sum().backward()
    want = torch.autograd.grad(ref_codes.sum(), z)[0]
    torch.testing.assert_close(z.grad, want, rtol=1e-5, atol=1e-7)


def test_even_levels_and_hard_clamp_are_value_errors():
    z = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"odd levels; got levels\[1\] = 4"):
        fsq_kernels.quantize(z, (5, 4), variant="ifsq")
    with pytest.raises(ValueError, match="odd levels"):
        fsq_kernels.indices_to_codes(torch.zeros(2, dtype=torch.int64), (5, 4), variant="ifsq")
    with pytest.raises(ValueError, match="hard_clamp"):
        fsq_kernels.quantize(z, (5, 5), variant="ifsq", hard_clamp=True)
    with pytest.raises(ValueError, match="odd levels"):
        fsq_kernels.FSQ([8, 5], variant="ifsq")
    out, idx = fsq_kernels.FSQ([7, 5], variant="ifsq")(torch.tensor([[0.0, 10.0]]))
    assert out.tolist() == [[0.0, 1.0]] and idx.tolist() == [3 + 4 * 7]
