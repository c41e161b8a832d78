"""Shared test configuration: the matching rule of DESIGN.md, tolerance tables, level sets."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors in the interpreter unless a GPU run is asked for
# (FSQ_TEST_DEVICE=cuda); the variable must be set before triton is imported.
if os.environ.get("FSQ_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fsq_kernels import reference  # noqa: E402

TEST_DEVICE = os.environ.get("FSQ_TEST_DEVICE", "cpu")

# The paper's Table-1 level sets, small mixes with L = 2, 3, 4, and a set with L in the hundreds.
TABLE1_LEVELS = [(8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5), (8, 8, 8, 5, 5, 5)]
SMALL_MIX_LEVELS = [(2, 3, 4), (4, 2), (3, 3, 2, 5)]
LARGE_LEVELS = [(300, 7)]
VARIANT_CLAMPS = [("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True)]

# Gradient tolerances against the float64 gradient formula (DESIGN.md "What matches").
GRAD_TOLERANCE = {
    torch.float64: dict(rtol=1e-7, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}


def boundary_window(levels, variant: str, hard_clamp: bool) -> torch.Tensor:
    """1e-5 * max(1, half_l) per channel: where float32 may round the other way."""
    half_l = reference.channel_constants(levels, variant, hard_clamp)["half_l"]
    return torch.tensor([1e-5 * max(1.0, h) for h in half_l], dtype=torch.float64)


def _channel_last_tokens(x: torch.Tensor, channel_first: bool, num_codebooks: int, d: int) -> torch.Tensor:
    x = x.movedim(1, -1) if channel_first else x
    return x.unflatten(-1, (num_codebooks, d))


def assert_matches_reference(
    codes: torch.Tensor,
    indices: torch.Tensor | None,
    z: torch.Tensor,
    levels,
    *,
    variant: str = "paper",
    hard_clamp: bool = False,
    channel_first: bool = False,
    num_codebooks: int = 1,
) -> int:
    """Assert a backend's (codes, indices) equal the float64 reference on the same input values,
    except where the reference's b lies within the boundary window; return the number of tokens
    that differ (all of them inside the window)."""
    levels = tuple(levels)
    d = len(levels)
    z_cpu = z.detach().cpu()
    ref_codes, ref_indices = reference.quantize(
        z_cpu.to(torch.float64), levels, variant=variant, hard_clamp=hard_clamp,
        channel_first=channel_first, num_codebooks=num_codebooks,
    )
    assert codes.dtype == z.dtype, f"codes dtype {codes.dtype} != input dtype {z.dtype}"
    assert codes.shape == z.shape, f"codes shape {tuple(codes.shape)} != input shape {tuple(z.shape)}"

    z_tokens = _channel_last_tokens(z_cpu, channel_first, num_codebooks, d)
    near = reference.distance_to_rounding_boundary(z_tokens, levels, variant, hard_clamp) < boundary_window(
        levels, variant, hard_clamp
    )
    got = _channel_last_tokens(codes.detach().cpu(), channel_first, num_codebooks, d)
    want = _channel_last_tokens(ref_codes, channel_first, num_codebooks, d).to(codes.dtype)
    nan_ok = torch.isnan(got) & torch.isnan(want)
    step = torch.finfo(codes.dtype).eps * want.abs().to(torch.float64)  # one rounding of the code value
    close = nan_ok | ((got.to(torch.float64) - want.to(torch.float64)).abs() <= step)
    bad_codes = ~close & ~near
    assert not bad_codes.any(), (
        f"{int(bad_codes.sum())} code values differ outside the boundary window, e.g. got "
        f"{got[bad_codes][:5].tolist()} want {want[bad_codes][:5].tolist()} for z {z_tokens[bad_codes][:5].tolist()}"
    )
    if indices is None:
        return 0
    expected_dtype = reference.index_dtype(levels)
    assert indices.dtype == expected_dtype, f"indices dtype {indices.dtype} != {expected_dtype}"
    assert indices.shape == ref_indices.shape, f"indices shape {tuple(indices.shape)} != {tuple(ref_indices.shape)}"
    got_idx = indices.detach().cpu().reshape(z_tokens.shape[:-1])
    want_idx = ref_indices.reshape(z_tokens.shape[:-1])
    differs = got_idx != want_idx
    outside = differs & ~near.any(dim=-1)
    assert not outside.any(), (
        f"{int(outside.sum())} indices differ outside the boundary window: got {got_idx[outside][:5].tolist()} "
        f"want {want_idx[outside][:5].tolist()}"
    )
    return int(differs.sum())


def expected_grad(z: torch.Tensor, levels, variant: str, hard_clamp: bool, channel_first: bool, num_codebooks: int):
    """DESIGN.md "Gradient", written out in float64: dcode/dz per element, z's layout."""
    d = len(levels)
    x = _channel_last_tokens(z.detach().cpu().to(torch.float64), channel_first, num_codebooks, d)
    c = reference.channel_constants(levels, variant, hard_clamp)
    shift = torch.tensor(c["shift"], dtype=torch.float64)
    scale = torch.tensor(c["half_l"], dtype=torch.float64) / torch.tensor(c["half_width"], dtype=torch.float64)
    if variant == "symmetric":
        shift, scale = torch.zeros_like(shift), torch.ones_like(scale)
    u = x + shift
    grad = ((u > -1) & (u < 1)).to(torch.float64) if hard_clamp else 1 - torch.tanh(u) ** 2
    grad = (grad * scale).flatten(-2)
    return grad.movedim(-1, 1) if channel_first else grad


@pytest.fixture
def device():
    return torch.device(TEST_DEVICE)
