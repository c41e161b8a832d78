"""What "matches the reference" means: the one rule shared by the tests and `python -m fsq_kernels check`.

A fused backend's indices and codes equal the float64 reference evaluated on the same input
values, except where the reference's pre-round value lies within 1e-5 * max(1, half_l) of a
rounding boundary (float32 may round the other way there). Codes may differ from the reference's
code by one rounding of the code value. Decode is exact. Gradients match the float64 formula
within GRAD_TOLERANCE. Residual FSQ: each stage's index is the float64 rounding of its stage input
given the implementation's own earlier choices, with the window widened by L^s at stage s.

Every check raises MismatchError (an AssertionError, so pytest shows it as a failed assert) with
what differs; nothing here uses `assert`, so the rule holds under `python -O` too.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = [
    "GRAD_TOLERANCE", "RULE", "MismatchError", "assert_decode_matches_reference", "assert_grad_close",
    "assert_matches_reference", "assert_residual_consistent", "assert_residual_output", "assert_residual_parity", "boundary_window",
    "channel_last_tokens", "residual_stage_inputs", "residual_windows",
]

RULE = (
    "indices and codes equal the float64 reference on the same input values, except where the "
    "reference's pre-round value lies within 1e-5 * max(1, half_l) of a rounding boundary; codes within one "
    "rounding of the code value; decode bit-exact; gradients within rtol/atol "
    "(fp32 1e-4/1e-6, bf16 1.6e-2/1e-5, fp16 1e-3/1e-5) of the float64 formula; residual stages: each "
    "index is the float64 rounding of its stage input, window x L^s at stage s"
)

# Gradient tolerances against the float64 gradient formula (docs/design.md "What matches").
GRAD_TOLERANCE = {
    torch.float64: dict(rtol=1e-7, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}


class MismatchError(AssertionError):
    """A backend's result differs from the reference outside what the rule allows."""


def _require(ok: bool, message) -> None:
    if not ok:
        raise MismatchError(message() if callable(message) else message)


def boundary_window(levels, variant: str, hard_clamp: bool) -> torch.Tensor:
    """1e-5 * max(1, half_l) per channel: where float32 may round the other way."""
    half_l = reference.channel_constants(levels, variant, hard_clamp)["half_l"]
    return torch.tensor([1e-5 * max(1.0, h) for h in half_l], dtype=torch.float64)


def channel_last_tokens(x: torch.Tensor, channel_first: bool, num_codebooks: int, d: int) -> torch.Tensor:
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
    """Check a backend's (codes, indices) against the float64 reference on the same input values,
    except where the reference's b lies within the boundary window; return the number of tokens
    that differ (all of them inside the window)."""
    levels = tuple(levels)
    d = len(levels)
    z_cpu = z.detach().cpu()
    ref_codes, ref_indices = reference.quantize(
        z_cpu.to(torch.float64), levels, variant=variant, hard_clamp=hard_clamp,
        channel_first=channel_first, num_codebooks=num_codebooks,
    )
    _require(codes.dtype == z.dtype, lambda: f"codes dtype {codes.dtype} != input dtype {z.dtype}")
    _require(codes.shape == z.shape, lambda: f"codes shape {tuple(codes.shape)} != input shape {tuple(z.shape)}")

    z_tokens = channel_last_tokens(z_cpu, channel_first, num_codebooks, d)
    near = reference.distance_to_rounding_boundary(z_tokens, levels, variant, hard_clamp) < boundary_window(
        levels, variant, hard_clamp
    )
    got = channel_last_tokens(codes.detach().cpu(), channel_first, num_codebooks, d)
    want = channel_last_tokens(ref_codes, channel_first, num_codebooks, d).to(codes.dtype)
    nan_ok = torch.isnan(got) & torch.isnan(want)
    step = torch.finfo(codes.dtype).eps * want.abs().to(torch.float64)  # one rounding of the code value
    close = nan_ok | ((got.to(torch.float64) - want.to(torch.float64)).abs() <= step)
    bad_codes = ~close & ~near
    _require(not bad_codes.any(), lambda: (
        f"{int(bad_codes.sum())} code values differ outside the boundary window, e.g. got "
        f"{got[bad_codes][:5].tolist()} want {want[bad_codes][:5].tolist()} for z {z_tokens[bad_codes][:5].tolist()}"
    ))
    if indices is None:
        return 0
    expected_dtype = reference.index_dtype(levels)
    _require(indices.dtype == expected_dtype, lambda: f"indices dtype {indices.dtype} != {expected_dtype}")
    _require(indices.shape == ref_indices.shape,
             lambda: f"indices shape {tuple(indices.shape)} != {tuple(ref_indices.shape)}")
    got_idx = indices.detach().cpu().reshape(z_tokens.shape[:-1])
    want_idx = ref_indices.reshape(z_tokens.shape[:-1])
    differs = got_idx != want_idx
    outside = differs & ~near.any(dim=-1)
    _require(not outside.any(), lambda: (
        f"{int(outside.sum())} indices differ outside the boundary window: got {got_idx[outside][:5].tolist()} "
        f"want {want_idx[outside][:5].tolist()}"
    ))
    return int(differs.sum())


def assert_decode_matches_reference(codes: torch.Tensor, indices: torch.Tensor, levels, *, variant: str = "paper",
                                    channel_first: bool = False, num_codebooks: int = 1) -> None:
    """Decode is exact: the reference's decode of the same indices in the same dtype, bit for bit."""
    want = reference.indices_to_codes(indices.detach().cpu(), tuple(levels), variant=variant,
                                      channel_first=channel_first, num_codebooks=num_codebooks, dtype=codes.dtype)
    _require(codes.shape == want.shape and codes.dtype == want.dtype,
             lambda: f"decoded {tuple(codes.shape)} {codes.dtype} != reference {tuple(want.shape)} {want.dtype}")
    got = codes.detach().cpu()
    _require(torch.equal(got, want), lambda: (
        f"{int((got != want).sum())} decoded values differ from the reference, e.g. got "
        f"{got[got != want][:5].tolist()} want {want[got != want][:5].tolist()}"
    ))


def assert_grad_close(grad: torch.Tensor, want: torch.Tensor) -> float:
    """grad within GRAD_TOLERANCE[grad.dtype] of the float64 `want`; returns the largest |difference|."""
    _require(grad.shape == want.shape, lambda: f"gradient shape {tuple(grad.shape)} != {tuple(want.shape)}")
    got = grad.detach().cpu().to(torch.float64)
    want = want.detach().cpu().to(grad.dtype).to(torch.float64)
    tol = GRAD_TOLERANCE[grad.dtype]
    bad = (got - want).abs() > tol["atol"] + tol["rtol"] * want.abs()
    _require(not bad.any(), lambda: (
        f"{int(bad.sum())} gradient values outside rtol={tol['rtol']}, atol={tol['atol']}: got "
        f"{got[bad][:5].tolist()} want {want[bad][:5].tolist()}"
    ))
    return float((got - want).abs().max()) if got.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# Residual FSQ: per-stage consistency with amplification-aware windows
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
    _require(not bad.any(), lambda: (
        f"{int(bad.sum())} stage indices are not the rounding of their stage input outside the window; "
        f"stages {bad.nonzero()[:5, -1].tolist()}"
    ))
    return int((active & (idx != want)).sum())


def assert_residual_output(out, indices, x, levels, *, channel_first: bool = False) -> None:
    """The output is the sum of the active stages' scaled codes for the implementation's own
    indices: within one rounding of out's dtype plus float32 accumulation noise per stage."""
    levels = tuple(levels)
    idx = indices.detach().cpu().to(torch.int64)
    got = out.detach().cpu()
    if channel_first:
        idx, got = idx.movedim(1, -1), got.movedim(1, -1)
    num_stages = idx.shape[-1]
    scales = torch.tensor(reference.residual_scales(levels, num_stages), dtype=torch.float64)
    codes = reference.indices_to_codes(idx.clamp_min(0), levels, variant="symmetric", dtype=torch.float64)
    want = ((codes * scales) * (idx >= 0).unsqueeze(-1)).sum(-2)
    _require(got.shape == want.shape and out.dtype == x.dtype,
             lambda: f"output {tuple(out.shape)} {out.dtype} != input {tuple(x.shape)} {x.dtype}")
    tol = torch.finfo(out.dtype).eps * want.abs() + num_stages * 4 * torch.finfo(torch.float32).eps
    bad = (got.to(torch.float64) - want).abs() > tol
    _require(not bad.any(), lambda: (
        f"{int(bad.sum())} output values differ from the sum of the stages' codes: got "
        f"{got[bad][:5].tolist()} want {want[bad][:5].tolist()}"
    ))


def assert_residual_parity(indices_a, indices_b, x, levels, *, soft_clamp, hard_clamp: bool = True, channel_first: bool = False) -> int:
    """Two implementations' stage indices agree up to the first stage where they differ, and
    there the stage input lies inside its window; returns the number of tokens that differ."""
    a, b = indices_a.detach().cpu().to(torch.int64), indices_b.detach().cpu().to(torch.int64)
    _require(a.shape == b.shape, lambda: f"{tuple(a.shape)} != {tuple(b.shape)}")
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
    _require(not bad.any(), lambda: f"{int(bad.sum())} tokens differ at a stage whose input is outside the window")
    return int(rows.sum())
