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


# ---------------------------------------------------------------------------------------------
# Residual FSQ matching: per-stage consistency with amplification-aware windows
# ---------------------------------------------------------------------------------------------


def residual_stage_inputs(x, levels, indices, *, soft_clamp, channel_first: bool):
    """The float64 value y_s each stage rounds, given the stage choices in `indices`.

    x: the quantizer input (channel-last or channel-first); indices: (..., q) channel-last or
    (B, q, ...) channel-first. Returns y (tokens..., q, d) in float64 (NaN for dropped stages).
    """
    levels = tuple(levels)
    h = x.detach().cpu().to(torch.float64)
    idx = indices.detach().cpu().to(torch.int64)
    if channel_first:
        h, idx = h.movedim(1, -1), idx.movedim(1, -1)
    if soft_clamp is not None:
        c = torch.tensor(soft_clamp, dtype=torch.float64)
        h = torch.tanh(h / c) * c
    num_stages = idx.shape[-1]
    scales = torch.tensor(reference.residual_scales(levels, num_stages), dtype=torch.float64)
    residual, ys = h, []
    for s in range(num_stages):
        ys.append(residual / scales[s])
        stage_idx = idx[..., s]
        dropped = stage_idx < 0
        code = reference.indices_to_codes(stage_idx.clamp_min(0), levels, variant="symmetric", dtype=torch.float64)
        ys[-1] = torch.where(dropped.unsqueeze(-1), float("nan"), ys[-1])
        residual = residual - torch.where(dropped.unsqueeze(-1), 0.0, code * scales[s])
    return torch.stack(ys, dim=-2)


def residual_windows(levels, num_stages: int, hard_clamp: bool) -> torch.Tensor:
    """(q, d): the single-stage window, times the amplification L_i^s of residual noise at stage s."""
    base = boundary_window(levels, "symmetric", hard_clamp)
    levels_t = torch.tensor(levels, dtype=torch.float64)
    amplification = torch.stack([levels_t**s for s in range(num_stages)])  # residual noise reaches stage s x L^s
    return amplification * base[None, :]


def assert_residual_consistent(indices, x, levels, *, soft_clamp, hard_clamp: bool = True, channel_first: bool = False) -> int:
    """Each stage's index is the float64 rounding of y_s given the implementation's own earlier
    choices, except where y_s lies inside the stage's window; returns the number of exceptions."""
    levels = tuple(levels)
    y = residual_stage_inputs(x, levels, indices, soft_clamp=soft_clamp, channel_first=channel_first)
    idx = indices.detach().cpu().to(torch.int64)
    idx = idx.movedim(1, -1) if channel_first else idx
    active = idx >= 0
    want = reference.quantize(y.nan_to_num(0.0), levels, variant="symmetric", hard_clamp=hard_clamp)[1].to(torch.int64)
    near = (reference.distance_to_rounding_boundary(y.nan_to_num(0.0), levels, "symmetric", hard_clamp)
            < residual_windows(levels, idx.shape[-1], hard_clamp)).any(-1)
    bad = active & (idx != want) & ~near
    assert not bad.any(), (
        f"{int(bad.sum())} stage indices are not the rounding of their stage input outside the window; "
        f"stages {bad.nonzero()[:5, -1].tolist()}"
    )
    return int((active & (idx != want)).sum())


def assert_residual_parity(indices_a, indices_b, x, levels, *, soft_clamp, hard_clamp: bool = True, channel_first: bool = False) -> int:
    """Two implementations' stage indices agree up to the first stage where they differ, and
    there the stage input lies inside its window; returns the number of tokens that differ."""
    a, b = indices_a.detach().cpu().to(torch.int64), indices_b.detach().cpu().to(torch.int64)
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    if channel_first:
        a, b = a.movedim(1, -1), b.movedim(1, -1)
    differs = a != b
    first = torch.where(differs.any(-1), differs.int().argmax(-1), -1)
    y = residual_stage_inputs(x, levels, indices_a, soft_clamp=soft_clamp, channel_first=channel_first)
    windows = residual_windows(levels, a.shape[-1], hard_clamp)
    dist = reference.distance_to_rounding_boundary(y.nan_to_num(0.0), tuple(levels), "symmetric", hard_clamp)
    near = (dist < windows).any(-1)  # (..., q)
    rows = first >= 0
    ok = near.gather(-1, first.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    bad = rows & ~ok
    assert not bad.any(), f"{int(bad.sum())} tokens differ at a stage whose input is outside the window"
    return int(rows.sum())
