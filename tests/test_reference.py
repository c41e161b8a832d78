"""The reference against the published formulas, written out here independently."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fsq_kernels
from fsq_kernels import reference

from .conftest import SMALL_MIX_LEVELS, TABLE1_LEVELS, expected_grad

ALL_SETS = TABLE1_LEVELS + SMALL_MIX_LEVELS


def appendix_paper(z: torch.Tensor, levels) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Appendix A.1 code, transcribed to float64 torch."""
    levels_t = torch.tensor(levels, dtype=torch.float64)
    eps = 1e-3
    half_l = (levels_t - 1) * (1 - eps) / 2
    offset = torch.where(levels_t % 2 == 1, 0.0, 0.5)
    shift = torch.tan(offset / half_l)
    bounded = torch.tanh(z + shift) * half_l - offset
    half_width = torch.div(levels_t, 2, rounding_mode="floor")
    zhat = torch.round(bounded) / half_width
    basis = torch.cumprod(torch.tensor([1.0] + list(levels[:-1]), dtype=torch.float64), 0)
    indices = ((zhat * half_width + half_width) * basis).sum(-1)
    return zhat, indices.round().to(torch.int64)


def vqp_atanh(z: torch.Tensor, levels, hard_clamp: bool) -> torch.Tensor:
    """vector-quantize-pytorch's `bound` (atanh shift, (1 + eps)), in float64."""
    levels_t = torch.tensor(levels, dtype=torch.float64)
    half_l = (levels_t - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
    shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
    squashed = torch.clamp(z + shift, -1, 1) if hard_clamp else torch.tanh(z + shift)
    bounded = squashed * half_l - offset
    return torch.round(bounded) / torch.div(levels_t, 2, rounding_mode="floor")


def symmetric_formula(z: torch.Tensor, levels, hard_clamp: bool) -> torch.Tensor:
    """arXiv 2411.19842: QL(x) = 2/(L-1) * floor((L-1)(tanh x + 1)/2 + 0.5) - 1."""
    levels_t = torch.tensor(levels, dtype=torch.float64)
    squashed = torch.clamp(z, -1, 1) if hard_clamp else torch.tanh(z)
    return 2 / (levels_t - 1) * torch.floor((levels_t - 1) * (squashed + 1) / 2 + 0.5) - 1


def random_z(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    z[: n // 8] *= 20  # saturated values
    return z


@pytest.mark.parametrize("levels", ALL_SETS, ids=str)
def test_paper_matches_appendix(levels):
    z = random_z(4096, len(levels))
    codes, indices = reference.quantize(z, levels, variant="paper")
    want_codes, want_indices = appendix_paper(z, levels)
    torch.testing.assert_close(codes, want_codes, rtol=0, atol=0)
    assert torch.equal(indices.to(torch.int64), want_indices)


@pytest.mark.parametrize("hard_clamp", [False, True])
@pytest.mark.parametrize("levels", TABLE1_LEVELS + [(3, 4), (7, 5, 3)], ids=str)
def test_atanh_matches_vector_quantize_pytorch_formula(levels, hard_clamp):
    z = random_z(4096, len(levels), seed=1)
    codes, _ = reference.quantize(z, levels, variant="atanh", hard_clamp=hard_clamp)
    torch.testing.assert_close(codes, vqp_atanh(z, levels, hard_clamp), rtol=0, atol=0)


@pytest.mark.parametrize("hard_clamp", [False, True])
@pytest.mark.parametrize("levels", ALL_SETS, ids=str)
def test_symmetric_matches_formula(levels, hard_clamp):
    z = random_z(4096, len(levels), seed=2)
    codes, _ = reference.quantize(z, levels, variant="symmetric", hard_clamp=hard_clamp)
    # The contract evaluates 2k/(L-1) - 1; the paper's 2/(L-1) * k may differ in the last bit.
    torch.testing.assert_close(codes, symmetric_formula(z, levels, hard_clamp), rtol=0, atol=4.5e-16)


@pytest.mark.parametrize("variant,hard_clamp", [("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True)])
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4), (300, 7), (1000,), (1500, 3)], ids=str)
def test_level_boundaries_agree_with_the_bound(levels, variant, hard_clamp):
    """k = #{boundaries below z} (the tanh-free forward) equals the rounded bound, away from ties."""
    z = random_z(20000, len(levels), seed=3)
    z[:50] = torch.linspace(-40, 40, 50, dtype=torch.float64).unsqueeze(-1)
    _, indices = reference.quantize(z, levels, variant=variant, hard_clamp=hard_clamp)
    k_bound = reference.indices_to_level_indices(indices, levels)
    boundaries = reference.level_boundaries(levels, variant, hard_clamp)
    k_count = torch.stack(
        [
            ((z[:, i : i + 1] >= torch.tensor(t, dtype=torch.float64)) if variant == "symmetric"
             else (z[:, i : i + 1] > torch.tensor(t, dtype=torch.float64))).sum(-1)
            for i, t in enumerate(boundaries)
        ],
        dim=-1,
    )
    near = reference.distance_to_rounding_boundary(z, levels, variant, hard_clamp) < 1e-9
    assert torch.equal(k_bound[~near], k_count[~near])


def test_paper_cannot_reach_outer_levels_beyond_1001():
    """The official formula saturates before the outermost levels for L > 1001 (documented)."""
    codes, indices = reference.quantize(torch.tensor([[math.inf], [-math.inf]], dtype=torch.float64), [1500], variant="paper")
    k = indices.tolist()
    assert 0 < k[1] and k[0] < 1499
    assert reference.level_boundaries([1500], "paper")[0][0] == -math.inf


@pytest.mark.parametrize("variant", ["paper", "atanh", "symmetric"])
@pytest.mark.parametrize("levels", TABLE1_LEVELS, ids=str)
def test_exhaustive_round_trip(levels, variant):
    size = math.prod(levels)
    indices = torch.arange(size)
    codes = fsq_kernels.indices_to_codes(indices, levels, variant=variant, backend="reference")
    back = fsq_kernels.codes_to_indices(codes, levels, variant=variant)
    assert torch.equal(back.to(torch.int64), indices)
    assert torch.equal(fsq_kernels.indices_to_codes(back, levels, variant=variant, backend="reference"), codes)
    # Every code is distinct and the codebook is exactly the decoded grid.
    assert torch.unique(codes, dim=0).shape[0] == size
    assert torch.equal(reference.implicit_codebook(levels, variant), codes)


def test_int64_indices_beyond_int32():
    levels = (1000, 1000, 1000, 1000)
    assert reference.index_dtype(levels) == torch.int64
    size = 1000**4
    indices = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**39 + 12345, size - 1], dtype=torch.int64)
    codes = fsq_kernels.indices_to_codes(indices, levels, dtype=torch.float64, backend="reference")
    assert torch.equal(fsq_kernels.codes_to_indices(codes, levels), indices)
    # quantize puts the top code at index size-1, exactly.
    z = torch.full((1, 4), 50.0, dtype=torch.float64)
    _, top = fsq_kernels.quantize(z, levels, variant="atanh", backend="reference")
    assert top.dtype == torch.int64 and top.item() == size - 1
    with pytest.raises(ValueError, match="more than"):
        reference.implicit_codebook(levels)


def grid_inputs(levels, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One z per code of the grid, in the middle of its level intervals, and that code's index."""
    per_channel = []
    for t in reference.level_boundaries(levels, variant):
        edges = [t[0] - 1.0] + [(a + b) / 2 for a, b in zip(t[:-1], t[1:])] + [t[-1] + 1.0]
        per_channel.append(torch.tensor(edges, dtype=torch.float64))
    indices = torch.arange(math.prod(levels))
    k = reference.indices_to_level_indices(indices, levels)
    z = torch.stack([per_channel[i][k[:, i]] for i in range(len(levels))], dim=-1)
    return z, indices


@pytest.mark.parametrize("variant", ["paper", "atanh", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_indices_exact_over_whole_grid(dtype, variant):
    levels = (8, 8, 8, 6, 5)
    z, want = grid_inputs(levels, variant)
    codes, indices = fsq_kernels.quantize(z.to(dtype), levels, variant=variant, backend="reference")
    assert indices.dtype == torch.int32
    assert torch.equal(indices.to(torch.int64), want)
    assert codes.dtype == dtype


def test_nan_inf_empty():
    levels = (8, 5, 5, 5)
    z = torch.zeros(3, 8)
    z[0, 1] = float("nan")
    z[1, :4] = float("inf")
    z[2, 4:] = -float("inf")
    codes, indices = reference.quantize(z, levels, num_codebooks=2)
    assert indices[0].tolist()[0] == -1 and indices[0, 1] >= 0
    assert torch.isnan(codes[0, 1]) and not torch.isnan(codes[0, [0, 2, 3]]).any()
    assert indices[1, 0] == reference.codebook_size(levels) - 1
    assert indices[2, 1] == 0
    empty_codes, empty_indices = reference.quantize(torch.empty(0, 2, 4), levels)
    assert empty_codes.shape == (0, 2, 4) and empty_indices.shape == (0, 2)


@pytest.mark.parametrize("variant,hard_clamp", [("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True)])
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4)], ids=str)
def test_gradient_is_straight_through_with_true_bound_derivative(levels, variant, hard_clamp):
    z = random_z(2000, len(levels), seed=4).requires_grad_(True)
    codes, _ = reference.quantize(z, levels, variant=variant, hard_clamp=hard_clamp)
    (grad,) = torch.autograd.grad(codes.sum(), z)
    want = expected_grad(z, levels, variant, hard_clamp, False, 1)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant,hard_clamp", [("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True)])
def test_gradcheck_bound(variant, hard_clamp):
    levels = (8, 5, 3)
    z = (torch.rand(16, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: reference.bound(x, levels, variant, hard_clamp), (z,))


@settings(max_examples=60, deadline=None)
@given(
    levels=st.lists(st.integers(2, 12), min_size=1, max_size=5),
    variant=st.sampled_from(["paper", "atanh", "symmetric"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_codes_indices_consistent(levels, variant, seed):
    """Codes decode from indices and re-encode to them, for any level set."""
    z = random_z(64, len(levels), seed=seed)
    codes, indices = reference.quantize(z, levels, variant=variant)
    assert indices.min() >= 0 and indices.max() < math.prod(levels)
    torch.testing.assert_close(reference.indices_to_codes(indices, levels, variant=variant, dtype=torch.float64), codes, rtol=0, atol=0)
    assert torch.equal(reference.codes_to_indices(codes, levels, variant=variant), indices)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hard_clamp", [False, True])
def test_symmetric_even_levels_tiny_negative_goes_down(dtype, hard_clamp):
    """symmetric, even L: the middle boundary is exactly 0 and ties go up, so -5e-17 < z < 0 is
    below it. tanh(z) + 1 rounds to 1 there, which made the bound-rounding reference go up."""
    z = torch.tensor([[-4e-17, -1e-30, 0.0, 1e-30, 4e-17]], dtype=torch.float64).T.to(dtype)
    _, idx = reference.quantize(z, [4], variant="symmetric", hard_clamp=hard_clamp)
    assert all(float(v) != 0 for v in z[[0, 1, 3, 4], 0])  # the tiny values survive the cast
    assert idx.tolist() == [1, 1, 2, 2, 2]


def test_comparison_boundaries_are_rounded_in_the_comparison_direction():
    """float32 boundaries: down for > (paper/atanh), up for >= (symmetric), each a float32 value
    within one float32 step of the float64 boundary."""
    import struct

    for variant, hc in [("paper", False), ("atanh", True), ("symmetric", False), ("symmetric", True)]:
        k0, rows = reference.comparison_boundaries((8, 5, 3), variant, hc, torch.float32)
        assert k0 == [0, 0, 0]
        for row32, row64 in zip(rows, reference.level_boundaries((8, 5, 3), variant, hc)):
            for t32, t64 in zip(row32, row64):
                assert struct.unpack("<f", struct.pack("<f", t32))[0] == t32
                assert (t32 >= t64 if variant == "symmetric" else t32 <= t64) or abs(t32 - t64) < 1e-15
                assert abs(t32 - t64) <= 2 ** -23 * max(abs(t64), 2 ** -126)


def test_residual_active_stages_tensor_needs_no_host_sync():
    """Quantize dropout as a 0-d tensor: masked with tensor ops (no .item(), so compile/export can
    trace it), same result as an int, -1 for dropped stages, no dependence on x with 0 stages."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoItem(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "host sync (.item())"
            return func(*args, **(kwargs or {}))

    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for active in (0, 2, 4):
        with NoItem():
            out, idx = reference.residual_quantize(x, (8, 5, 5, 5), 4, active_stages=torch.tensor(active))
        out_int, idx_int = reference.residual_quantize(x, (8, 5, 5, 5), 4, active_stages=active)
        assert torch.equal(idx, idx_int) and torch.equal(out, out_int)
        assert (idx[:, active:] == -1).all() and (idx[:, :active] >= 0).all()
    xn = x.detach().clone()
    xn[0, 0] = float("nan")
    xn.requires_grad_(True)
    out, _ = reference.residual_quantize(xn, (8, 5, 5, 5), 4, soft_clamp=[1.2] * 4, active_stages=torch.tensor(0))
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(xn.grad, torch.zeros_like(xn))


def test_comparison_boundaries_under_flush_to_zero():
    """The training commands set torch.set_flush_denormal(True); the exact boundary search must
    neither hang nor change under it (its float32 neighbour steps go through subnormals), and the
    flush mode is left as it was."""
    from fsq_kernels import exact

    levels = (8, 6, 4, 2)
    want = reference.comparison_boundaries(levels, "symmetric", False, torch.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        got = reference.comparison_boundaries(levels, "symmetric", False, torch.float32)
        assert got == want and 0.0 in got[1][0]  # the boundary at exactly 0 (even L) rounds to 0
        assert struct.unpack("<f", struct.pack("<i", 1))[0] == 0.0  # flushing is still on
        with exact.ieee_subnormals():
            assert struct.unpack("<f", struct.pack("<i", 1))[0] > 0.0
    finally:
        torch.set_flush_denormal(False)
