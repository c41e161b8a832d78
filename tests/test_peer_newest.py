"""vector-quantize-pytorch's newest FSQ behaviour (issue 16 part 3), which its 1.32 release fails:
exact round trips with an orthogonal rotation, channel-first residual decoding, and the peer's
public quantizer steps (bound, symmetry_preserving_bound, quantize) on the compat module."""

from __future__ import annotations

import pytest
import torch

import fsq_kernels
from fsq_kernels.compat.vector_quantize_pytorch import FSQ as CompatFSQ
from fsq_kernels.compat.vector_quantize_pytorch import GroupedResidualFSQ, ResidualFSQ

from .conftest import cpu_backends

vqp = pytest.importorskip("vector_quantize_pytorch")

# CPU tensors throughout (the peer is the oracle there); device paths: the sweep and `check`.
BACKENDS = cpu_backends()
RESIDUAL_BACKENDS = cpu_backends("residual_quantize")


# -- orthogonal rotation: indices -> codes -> indices and forward -> codes -> indices, exactly ---------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "module,kwargs",
    [
        (fsq_kernels.FSQ, {}),
        (fsq_kernels.FSQ, dict(preserve_symmetry=True)),
        (fsq_kernels.FSQ, dict(num_codebooks=2)),
        (CompatFSQ, {}),
        (CompatFSQ, dict(preserve_symmetry=True, keep_num_codebooks_dim=True)),
    ],
    ids=lambda v: getattr(v, "__module__", None) or str(v),
)
def test_rotation_round_trips_exactly(module, kwargs, backend):
    torch.manual_seed(0)
    fsq = module([5, 5], orthogonal_rotation=True, backend=backend, **kwargs)
    every = torch.arange(fsq.codebook_size)
    indices = every.unsqueeze(-1).expand(-1, fsq.num_codebooks).contiguous() if fsq.keep_num_codebooks_dim else every
    if fsq.num_codebooks > 1:
        indices[:, 1] = every.flip(0)
    decoded = fsq.indices_to_codes(indices)
    assert torch.equal(fsq.codes_to_indices(decoded).reshape(indices.shape).long(), indices)

    z = torch.randn(3, 37, fsq.dim) * 2
    out, forward_indices = fsq(z)
    assert torch.equal(fsq.codes_to_indices(out).reshape(forward_indices.shape), forward_indices)
    assert torch.equal(fsq.indices_to_codes(forward_indices), out)


def test_rotation_with_projections_takes_codes_in_the_quantizers_space():
    torch.manual_seed(0)
    fsq = fsq_kernels.FSQ([5, 5, 5], dim=8, orthogonal_rotation=True)
    z = torch.randn(4, 20, 8)
    _, indices = fsq(z)
    grid_input = fsq._rotate(fsq.project_in(z), fsq.orthogonal_rot).detach()
    grid_codes, _ = fsq_kernels.quantize(grid_input, fsq.levels, variant=fsq.variant)
    assert torch.equal(fsq.codes_to_indices(grid_codes), indices)
    # The rotation is undone only where codes_to_indices can invert indices_to_codes.
    assert torch.equal(fsq.codes_to_indices(fsq.implicit_codebook), torch.arange(fsq.codebook_size, dtype=torch.int32))


def test_codes_to_indices_names_the_wrong_channel_count():
    fsq = fsq_kernels.FSQ([5, 5], orthogonal_rotation=True, num_codebooks=2)
    with pytest.raises(ValueError, match="channels"):
        fsq.codes_to_indices(torch.zeros(3, 3))


# -- residual FSQ, channel-first: decode (B, Q, ...) and (G, B, Q, ...) as forward returns them ------


def _peer_and_ours(peer_cls, ours_cls, backend: str = "auto", **kwargs):
    torch.manual_seed(0)
    peer = peer_cls(**kwargs)
    ours = ours_cls(**kwargs, backend=backend)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer.eval(), ours.eval()


@pytest.mark.parametrize("backend", RESIDUAL_BACKENDS)
@pytest.mark.parametrize("dim", [4, 12])
def test_residual_channel_first_decodes_forward_indices(dim, backend):
    case = dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=dim, is_channel_first=True, quantize_dropout=True)
    peer, ours = _peer_and_ours(vqp.ResidualFSQ, ResidualFSQ, backend, **case)
    x = torch.randn(2, dim, 5, 3)
    quantized, indices, all_codes = ours(x, return_all_codes=True)
    assert indices.shape == (2, 4, 5, 3)
    assert torch.equal(ours.get_output_from_indices(indices), quantized)
    assert torch.equal(ours.get_codes_from_indices(indices), all_codes)
    # The oracle decodes the same indices laid out channel-last (its 1.32 rejects channel-first ones).
    stage_last = indices.movedim(1, -1).long()
    torch.testing.assert_close(all_codes, peer.get_codes_from_indices(stage_last), rtol=1e-6, atol=1e-7)
    want = peer.get_output_from_indices(stage_last).movedim(-1, 1)
    torch.testing.assert_close(ours.get_output_from_indices(indices), want, rtol=1e-5, atol=1e-6)

    # Fewer stages: indices[:, :k] decode as the first k stages of the forward ...
    for k in (1, 3):
        coarse = ours.get_output_from_indices(indices[:, :k])
        torch.testing.assert_close(coarse, ours.project_out(all_codes[:k].sum(0)).movedim(-1, 1), rtol=0, atol=0)
    # ... and a forward that dropped stages decodes, cut to its kept stages, to its own output.
    ours.train()
    for seed in range(40):
        quantized, indices = ours(x, rand_quantize_dropout_fixed_seed=seed)
        kept = int((indices[0, :, 0, 0] >= 0).sum())
        if kept < 4:
            break
    assert kept < 4, "no seed in 0..39 dropped a stage"
    assert torch.equal(ours.get_output_from_indices(indices), quantized)
    assert torch.equal(ours.get_output_from_indices(indices[:, :kept]), quantized)


def test_residual_fewer_stages_without_dropout_is_refused():
    ours = ResidualFSQ(levels=[5, 5], num_quantizers=3, is_channel_first=True).eval()
    _, indices = ours(torch.randn(2, 2, 6))
    with pytest.raises(ValueError, match="quantize_dropout"):
        ours.get_output_from_indices(indices[:, :2])


@pytest.mark.parametrize("dim", [8, 24])
def test_grouped_residual_channel_first_decodes_forward_indices(dim):
    case = dict(dim=dim, groups=2, accept_image_fmap=True, is_channel_first=True, levels=[8, 5, 5, 5], num_quantizers=3, quantize_dropout=True)
    peer, ours = _peer_and_ours(vqp.GroupedResidualFSQ, GroupedResidualFSQ, **case)
    x = torch.randn(2, dim, 4, 5)
    quantized, indices = ours(x)
    quantized_peer, _ = peer(x)
    torch.testing.assert_close(quantized, quantized_peer, rtol=1e-5, atol=1e-5)
    assert indices.shape == (2, 2, 3, 4, 5)  # (G, B, Q, H, W)
    assert torch.equal(ours.get_output_from_indices(indices), quantized)
    codes = ours.get_codes_from_indices(indices)
    assert codes.shape == (2, 3, 2, 4, 5, 4)  # (G, Q, B, H, W, d)
    # Fewer stages per group: indices[:, :, :k].
    coarse = ours.get_output_from_indices(indices[:, :, :1])
    want = torch.cat([rvq.project_out(c[:1].sum(0)).movedim(-1, 1) for rvq, c in zip(ours.rvqs, codes)], dim=1)
    torch.testing.assert_close(coarse, want, rtol=0, atol=0)


# -- the compat FSQ's bound / symmetry_preserving_bound / quantize, against the peer's 1.32 ---------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(levels=[8, 5, 5, 5]),
        dict(levels=[8, 6, 5], bound_hard_clamp=True),
        dict(levels=[2, 3, 5], preserve_symmetry=True),
        dict(levels=[4, 4], preserve_symmetry=True, bound_hard_clamp=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("method", ["bound", "symmetry_preserving_bound", "quantize"])
def test_compat_quantizer_steps_match_the_peer(kwargs, method):
    peer, ours = vqp.FSQ(**kwargs), CompatFSQ(**kwargs)
    torch.manual_seed(1)
    z = (torch.randn(3, 7, 2, len(kwargs["levels"])) * 2).requires_grad_()
    got, want = getattr(ours, method)(z), getattr(peer, method)(z)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-7)
    if method == "quantize":  # codes on the module's own grid index alike
        assert torch.equal(ours.codes_to_indices(got.detach()), peer.codes_to_indices(want.detach()))
    grad_got, = torch.autograd.grad(got.square().sum(), z)
    grad_want, = torch.autograd.grad(want.square().sum(), z)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)


def test_compat_bound_errors():
    fsq = CompatFSQ([8, 5, 5, 5])
    with pytest.raises(ValueError, match="eps"):
        fsq.bound(torch.zeros(4), eps=1e-2)
    with pytest.raises(ValueError, match="codebook_dim=4"):
        fsq.quantize(torch.zeros(2, 5))
