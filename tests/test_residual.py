"""ResidualFSQ / GroupedResidualFSQ: reference, backends and parity with vector-quantize-pytorch."""

from __future__ import annotations

import pytest
import torch

import fsq_kernels
from fsq_kernels import reference
from fsq_kernels.compat.vector_quantize_pytorch import GroupedResidualFSQ, ResidualFSQ

from .conftest import GRAD_TOLERANCE, assert_residual_consistent, assert_residual_parity, backend_params

vqp = pytest.importorskip("vector_quantize_pytorch")

LEVELS = (8, 5, 5, 5)


def _soft_clamp(module: ResidualFSQ):
    return module.soft_clamp


def _quantizer_input(module: ResidualFSQ, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """What the fused op sees (after project_in) and whether it is channel-first."""
    if not module.has_projections:
        return x, module.is_channel_first
    h = x.movedim(1, -1) if module.is_channel_first else x
    return module.project_in(h).detach(), False


CASES = [
    dict(levels=[8, 5, 5, 5], num_quantizers=4),
    dict(levels=[8, 5, 5, 5], num_quantizers=8),
    dict(levels=[5, 5, 5], num_quantizers=6, dim=32),
    dict(levels=[8, 5, 5, 5], num_quantizers=4, is_channel_first=True),
    dict(levels=[7, 5, 5, 5, 5], num_quantizers=3, dim=16, is_channel_first=True),
    dict(levels=[8, 5, 5, 5], num_quantizers=4, bound_hard_clamp=False, soft_clamp_input_value=1.5),
    dict(levels=[8, 5, 5, 5], num_quantizers=4, bound_hard_clamp=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_residual_parity_with_vector_quantize_pytorch(case):
    torch.manual_seed(0)
    peer = vqp.ResidualFSQ(**case).eval()
    ours = ResidualFSQ(**case).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(peer.state_dict())
    dim = peer.project_in.in_features if ours.has_projections else len(case["levels"])
    x = torch.randn(3, dim, 9, 11) if case.get("is_channel_first") else torch.randn(3, 200, dim)
    out_peer, idx_peer = peer(x)
    out_ours, idx_ours = ours(x)
    assert idx_ours.shape == idx_peer.shape
    torch.testing.assert_close(out_ours, out_peer, rtol=1e-5, atol=1e-5)
    h, channel_first = _quantizer_input(ours, x)
    if ours.has_projections and case.get("is_channel_first"):
        idx_ours, idx_peer = idx_ours.movedim(1, -1), idx_peer.movedim(1, -1)
    hard = case.get("bound_hard_clamp", True)
    assert_residual_parity(idx_ours, idx_peer, h, case["levels"], soft_clamp=_soft_clamp(ours), hard_clamp=hard, channel_first=channel_first)
    assert_residual_consistent(idx_ours, h, case["levels"], soft_clamp=_soft_clamp(ours), hard_clamp=hard, channel_first=channel_first)


def test_residual_codes_and_output_from_indices_match_peer():
    torch.manual_seed(0)
    case = dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=16)
    peer, ours = vqp.ResidualFSQ(**case).eval(), ResidualFSQ(**case).eval()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 50, 16)
    _, idx, codes_ours = ours(x, return_all_codes=True)
    torch.testing.assert_close(codes_ours, peer.get_codes_from_indices(idx.long()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.get_output_from_indices(idx), peer.get_output_from_indices(idx.long()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.codebooks, peer.codebooks)


def test_quantize_dropout_matches_peer_for_a_fixed_seed():
    torch.manual_seed(0)
    case = dict(levels=[8, 5, 5, 5], num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    peer, ours = vqp.ResidualFSQ(**case).train(), ResidualFSQ(**case).train()
    x = torch.randn(2, 40, 4)
    for seed in range(8):
        out_peer, idx_peer = peer(x, rand_quantize_dropout_fixed_seed=seed)
        out_ours, idx_ours = ours(x, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal((idx_ours < 0), (idx_peer < 0)), f"seed {seed}: different stages dropped"
        torch.testing.assert_close(out_ours, out_peer, rtol=1e-5, atol=1e-5)
    # Fewer stages reconstruct too (the dropped ones count as zero).
    coarse = ours.get_output_from_indices(idx_ours[..., :2])
    assert coarse.shape == (2, 40, 4)


def test_grouped_residual_parity():
    torch.manual_seed(0)
    case = dict(dim=16, groups=2, levels=[8, 5, 5, 5], num_quantizers=3)
    peer, ours = vqp.GroupedResidualFSQ(**case).eval(), GroupedResidualFSQ(**case).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 30, 16)
    out_peer, idx_peer = peer(x)
    out_ours, idx_ours = ours(x)
    torch.testing.assert_close(out_ours, out_peer, rtol=1e-5, atol=1e-5)
    assert idx_ours.shape == idx_peer.shape == (2, 2, 30, 3)
    for group, rvq in enumerate(ours.rvqs):
        h = rvq.project_in(x.chunk(2, dim=-1)[group]).detach()
        assert_residual_parity(idx_ours[group], idx_peer[group], h, case["levels"], soft_clamp=rvq.soft_clamp)
    torch.testing.assert_close(ours.get_output_from_indices(idx_ours), peer.get_output_from_indices(idx_peer.long()), rtol=1e-5, atol=1e-5)


def expected_residual_grad(x, levels, num_stages, soft_clamp, indices, channel_first=False):
    """d(out)/dx for hard-clamped stages: softclamp'(x) * #{active stages s : -1 < y_s < 1}, and
    where that count is uncertain: some |y_s| within its stage's window of the clamp edge 1."""
    from .conftest import residual_stage_inputs, residual_windows

    h = x.detach().to(torch.float64)
    h = h.movedim(1, -1) if channel_first else h
    c = torch.tensor(soft_clamp, dtype=torch.float64)
    soft_grad = 1 - torch.tanh(h / c) ** 2
    y = residual_stage_inputs(x, levels, indices, soft_clamp=soft_clamp, channel_first=channel_first)
    inside = ((y > -1) & (y < 1)).sum(-2).to(torch.float64)
    uncertain = ((y.abs() - 1).abs() < residual_windows(levels, num_stages, True)).any(-2)
    grad = soft_grad * inside
    if channel_first:
        return grad.movedim(-1, 1), uncertain.movedim(-1, 1)
    return grad, uncertain


@pytest.mark.parametrize("backend,device", backend_params("residual_quantize"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("num_stages,active", [(4, 4), (8, 8), (6, 3)])
def test_residual_backends(backend, device, dtype, channel_first, num_stages, active):
    soft_clamp = reference.residual_soft_clamp(LEVELS)
    shape = (2, 4, 5, 7) if channel_first else (3, 33, 4)
    x = (torch.randn(shape) * 1.5).to(dtype).to(device).requires_grad_(True)
    out, idx = fsq_kernels.residual_quantize(
        x, LEVELS, num_stages, soft_clamp=soft_clamp, channel_first=channel_first, active_stages=active, backend=backend
    )
    assert out.dtype == dtype and out.shape == x.shape
    stage_axis = 1 if channel_first else -1
    assert idx.shape[stage_axis] == num_stages and idx.dtype == torch.int32
    assert (idx.narrow(stage_axis, active, num_stages - active) == -1).all()
    assert (idx.narrow(stage_axis, 0, active) >= 0).all()
    assert_residual_consistent(idx, x, LEVELS, soft_clamp=soft_clamp, channel_first=channel_first)
    ref_out, ref_idx = fsq_kernels.residual_quantize(
        x.detach(), LEVELS, num_stages, soft_clamp=soft_clamp, channel_first=channel_first, active_stages=active, backend="reference"
    )
    assert_residual_parity(idx, ref_idx, x, LEVELS, soft_clamp=soft_clamp, channel_first=channel_first)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    want, uncertain = expected_residual_grad(x, LEVELS, num_stages, soft_clamp, idx, channel_first)
    # Deep stages amplify float32 noise by L^s: their clamp indicator is noise. With few stages
    # almost every element is certain.
    if active <= 4:
        assert uncertain.float().mean() < 0.05
    torch.testing.assert_close(grad.cpu()[~uncertain], want.to(dtype)[~uncertain], **GRAD_TOLERANCE[dtype])


def test_residual_errors():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="num_stages must be an int >= 1; got 0"):
        fsq_kernels.residual_quantize(x, LEVELS, 0)
    with pytest.raises(ValueError, match=r"active_stages must be an int in \[0, num_stages=3\]; got 4"):
        fsq_kernels.residual_quantize(x, LEVELS, 3, active_stages=4)
    with pytest.raises(ValueError, match="soft_clamp must hold 4 positive values"):
        fsq_kernels.residual_quantize(x, LEVELS, 3, soft_clamp=[1.0, 2.0])
    with pytest.raises(ValueError, match="x must have 4 channels"):
        fsq_kernels.residual_quantize(torch.randn(2, 5), LEVELS, 3)
    with pytest.raises(ValueError, match="soft_clamp_input_value is set by bound_hard_clamp=True"):
        ResidualFSQ(levels=LEVELS, num_quantizers=2, soft_clamp_input_value=1.2)
    with pytest.raises(ValueError, match="needs quantize_dropout=True"):
        ResidualFSQ(levels=LEVELS, num_quantizers=4).get_codes_from_indices(torch.zeros(2, 3, dtype=torch.long))


def test_quantize_dropout_draw_only_when_dropping():
    """Without quantize dropout a training forward draws nothing (no RNG use, no DDP all_reduce);
    with it, the draw is a device tensor and every kept-stage count in range occurs."""
    grouped = GroupedResidualFSQ(dim=8, groups=2, levels=[5, 5, 5, 5], num_quantizers=4).train()
    x = torch.randn(3, 5, 8)
    state = torch.get_rng_state()
    grouped(x)
    assert torch.equal(torch.get_rng_state(), state)

    dropping = ResidualFSQ(levels=[5, 5, 5, 5], num_quantizers=4, quantize_dropout=True,
                           quantize_dropout_cutoff_index=1).train()
    torch.manual_seed(0)
    kept = set()
    for _ in range(60):
        _, indices = dropping(torch.randn(2, 3, 4))
        kept.add(int((indices[0, 0] >= 0).sum()))
    assert kept == {2, 3, 4}  # cutoff index 1: at least 2 stages kept
