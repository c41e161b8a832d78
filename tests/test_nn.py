"""The FSQ module and the vector-quantize-pytorch look-alike, against the peer itself."""

from __future__ import annotations

import pytest
import torch

import fsq_kernels
from fsq_kernels import reference
from fsq_kernels.compat.vector_quantize_pytorch import FSQ as CompatFSQ

from .conftest import assert_matches_reference

vqp = pytest.importorskip("vector_quantize_pytorch")

OUTPUT_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _peer_and_ours(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    peer = vqp.FSQ(**kwargs)
    ours = CompatFSQ(**kwargs, backend=kwargs.pop("backend", "auto"))
    missing, unexpected = ours.load_state_dict(peer.state_dict(), strict=True)
    assert not missing and not unexpected
    assert set(ours.state_dict()) == set(peer.state_dict())
    return peer.eval(), ours.eval()


def _pre_quantization(ours: CompatFSQ, z: torch.Tensor, channel_first: bool) -> torch.Tensor:
    """What the quantizer sees: channel-last, projected, rotated (to locate boundary ties)."""
    x = z.movedim(1, -1) if channel_first else z
    x = ours.project_in(x)
    if ours.orthogonal_rotation:
        x = ours._rotate(x, ours.orthogonal_rot)
    return x


PARITY_CASES = [
    dict(levels=[8, 5, 5, 5]),
    dict(levels=[8, 6, 5], dim=16),
    dict(levels=[7, 5, 5, 5, 5], dim=12, projection_has_bias=False),
    dict(levels=[8, 5, 5, 5], num_codebooks=2),
    dict(levels=[8, 5, 5, 5], dim=32, num_codebooks=2),
    dict(levels=[8, 5, 5, 5], keep_num_codebooks_dim=True),
    dict(levels=[8, 5, 5, 5], channel_first=True),
    dict(levels=[2, 3, 5], preserve_symmetry=True),
    dict(levels=[8, 5, 5, 5], preserve_symmetry=True, dim=8),
    dict(levels=[8, 5, 5, 5], bound_hard_clamp=True),
    dict(levels=[4, 4, 4, 4], preserve_symmetry=True, bound_hard_clamp=True),
    dict(levels=[5, 5, 5, 5], orthogonal_rotation=True, dim=12),
    dict(levels=[8, 5, 5, 5], return_indices=False),
    dict(levels=[8, 5, 5, 5], preserve_symmetry=True, noise_dropout=0.5),
]


@pytest.mark.parametrize("kind", ["sequence", "image", "video"])
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_parity_with_vector_quantize_pytorch(case, kind):
    peer, ours = _peer_and_ours(**case)
    dim = peer.dim
    torch.manual_seed(1)
    shape = {"sequence": (3, 50, dim), "image": (2, dim, 6, 7), "video": (2, dim, 3, 4, 5)}[kind]
    if kind == "sequence" and case.get("channel_first"):
        shape = (3, dim, 50)
    z = torch.randn(shape) * 2
    channel_first = z.dim() >= 4 or case.get("channel_first", False)

    out_peer, idx_peer = peer(z)
    out_ours, idx_ours = ours(z)
    torch.testing.assert_close(out_ours, out_peer, **OUTPUT_TOLERANCE[torch.float32])
    if not case.get("return_indices", True):
        assert idx_ours is None and idx_peer is None
        return
    assert idx_ours.shape == idx_peer.shape
    x = _pre_quantization(ours, z, channel_first)
    c = ours.num_codebooks
    # Our indices equal the float64 reference on what the quantizer saw, outside the window.
    x = x.detach()
    codes = fsq_kernels.quantize(x, ours.levels, variant=ours.variant, hard_clamp=ours.bound_hard_clamp, num_codebooks=c)[0]
    token_indices = idx_ours.reshape(x.shape[:-1] + ((c,) if c > 1 else ()))
    assert_matches_reference(
        codes, token_indices, x, ours.levels, variant=ours.variant, hard_clamp=ours.bound_hard_clamp, num_codebooks=c
    )
    # The peer computes in float32 too: it may differ from us only inside the window.
    differs = (idx_ours != idx_peer).reshape(x.shape[:-1] + (c,))
    near = reference.distance_to_rounding_boundary(x.unflatten(-1, (c, -1)), ours.levels, ours.variant, ours.bound_hard_clamp) < 1e-4
    assert not (differs & ~near.any(-1)).any()

    # Decoding indices gives the module's output, as the peer's indices_to_codes does.
    torch.testing.assert_close(ours.indices_to_codes(idx_ours), peer.indices_to_codes(idx_peer), **OUTPUT_TOLERANCE[torch.float32])


def test_bf16_codes_peer_loses_indices_ours_stays_exact():
    """The peer sums bf16 codes times the basis in bf16; past 256 codes the index is lost.

    (Its forward with force_quantization_f32=False is exact on CPU in vqp 1.32: its float32
    level constants promote bf16 z to float32. That finding is asserted too.)
    """
    levels = [8, 8, 8, 6, 5]
    peer, ours = _peer_and_ours(levels=levels, force_quantization_f32=False)
    from .test_reference import grid_inputs

    z, want = grid_inputs(tuple(levels), "atanh")
    z = z.to(torch.bfloat16).unsqueeze(0)
    codes_ours, idx_ours = ours(z)
    _, idx_peer = peer(z)
    assert codes_ours.dtype == torch.bfloat16
    assert torch.equal(idx_ours[0].long(), want)
    assert torch.equal(idx_peer[0].long(), want)

    lost = (peer.codes_to_indices(codes_ours[0]).long() != want).sum().item()
    assert lost > 1000, f"expected the peer to lose many indices from bf16 codes, lost {lost}"
    assert torch.equal(ours.codes_to_indices(codes_ours[0]).long(), want)


def test_module_defaults_and_attributes():
    fsq = fsq_kernels.FSQ([8, 5, 5, 5])
    assert fsq.variant == "paper" and fsq.codebook_size == 1000 and fsq.codebook_dim == 4
    assert fsq.effective_codebook_dim == 4 and fsq.dim == 4
    assert fsq.implicit_codebook.shape == (1000, 4)
    assert fsq_kernels.FSQ([8, 5, 5, 5], preserve_symmetry=True).variant == "symmetric"
    assert CompatFSQ([8, 5, 5, 5]).variant == "atanh"
    idx = torch.tensor([0, 7, 999])
    assert torch.equal(fsq.codes_to_indices(fsq.implicit_codebook[idx]), idx.int())
    assert fsq.indices_to_level_indices(torch.tensor([999])).tolist() == [[7, 4, 4, 4]]


def test_module_channel_first_without_projection_reads_strides():
    fsq = fsq_kernels.FSQ([8, 5, 5, 5], channel_first=True)
    z = torch.randn(2, 4, 5, 6)
    out, idx = fsq(z)
    codes, want = fsq_kernels.quantize(z, [8, 5, 5, 5], channel_first=True, backend="reference")
    assert torch.equal(out, codes) and torch.equal(idx, want)
    assert idx.shape == (2, 5, 6)


def test_module_keeps_projection_dtype_under_autocast():
    fsq = fsq_kernels.FSQ([8, 5, 5, 5], dim=16)
    z = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, idx = fsq(z)
        out_ref, idx_ref = fsq(z.bfloat16().float())
    assert out.dtype == torch.bfloat16  # project_out runs under autocast
    assert idx.dtype == torch.int32


def test_module_gradient_flows_through_projections():
    fsq = fsq_kernels.FSQ([8, 5, 5, 5], dim=16)
    z = torch.randn(4, 16, requires_grad=True)
    out, _ = fsq(z)
    out.square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert fsq.project_in.weight.grad.abs().sum() > 0


def test_compat_asserts():
    with pytest.raises(AssertionError, match="preserve_symmetry"):
        CompatFSQ([2, 5, 5])
    with pytest.raises(ValueError, match="preserve_symmetry"):
        CompatFSQ([8, 5], noise_dropout=0.2)
    # The core module accepts L = 2 with the paper's bound (asymmetric codes {-1, 0}).
    codes, _ = fsq_kernels.FSQ([2, 5])(torch.tensor([[-5.0, 0.0], [5.0, 0.0]]))
    assert codes[:, 0].tolist() == [-1.0, 0.0]


def test_noise_dropout_only_in_training():
    fsq = fsq_kernels.FSQ([5, 5, 5], preserve_symmetry=True, noise_dropout=0.5)
    z = torch.randn(64, 3)
    fsq.eval()
    out_eval, _ = fsq(z)
    assert torch.equal(out_eval, fsq_kernels.quantize(z, [5, 5, 5], variant="symmetric")[0])
    fsq.train()
    out_train, _ = fsq(z)
    assert not torch.equal(out_train, out_eval)
    assert out_train.abs().max() <= 1.0
