"""Golden values from codecs that ship FSQ: S3Tokenizer / CosyVoice2, NVIDIA NeMo, NVIDIA Cosmos."""

from __future__ import annotations

import math

import pytest
import torch

import fsq_kernels
from fsq_kernels import reference
from fsq_kernels.compat import nemo
from fsq_kernels.compat.vector_quantize_pytorch import FSQ as CompatFSQ

from .conftest import boundary_window, cpu_backends

# Goldens are checked on the backends that take CPU tensors in this run; the device paths are
# covered by the exact sweep and `python -m fsq_kernels check --device cuda`.
BACKENDS = cpu_backends()

# -- S3Tokenizer (CosyVoice2): tanh(z) * 0.999, round, + 1, base 3, least significant digit first ---

S3_LEVELS = [3] * 8
S3_PRE_TANH = {2: 20.0, 1: 0.0, 0: -20.0}  # pre-tanh values that land on each digit
S3_GOLDEN = [([2, 0, 0, 0, 0, 2, 0, 0], 488), ([1, 0, 0, 0, 0, 2, 0, 0], 487), ([0, 1, 2, 0, 1, 2, 0, 1], 2775)]


def s3tokenizer_ids(h: torch.Tensor) -> torch.Tensor:
    """S3Tokenizer's FSQCodebook.encode after project_down (s3tokenizer/model_v2.py), the codec's
    own three lines: the external oracle for the sweep below."""
    digits = (h.float().tanh() * 0.9990000128746033).round() + 1
    return (digits * torch.pow(3, torch.arange(8, dtype=digits.dtype))).sum(-1).int()


@pytest.mark.parametrize("backend", BACKENDS)
def test_s3tokenizer_golden_ids(backend):
    z = torch.tensor([[S3_PRE_TANH[d] for d in digits] for digits, _ in S3_GOLDEN])
    _, ids = fsq_kernels.quantize(z, S3_LEVELS, variant="paper", backend=backend)
    assert ids.tolist() == [token for _, token in S3_GOLDEN]
    assert fsq_kernels.FSQ(S3_LEVELS, backend=backend)(z)[1].tolist() == ids.tolist()
    # Digits pack least significant first: the basis is 3^i.
    assert reference.basis(S3_LEVELS) == [3**i for i in range(8)]
    assert fsq_kernels.FSQ(S3_LEVELS).indices_to_level_indices(torch.tensor(2775)).tolist() == S3_GOLDEN[2][0]


def test_s3tokenizer_scale_is_the_paper_half_width_in_float32():
    # S3Tokenizer's 0.9990000128746033 is float32(0.999) = float32((L - 1)(1 - eps) / 2) at L = 3.
    half_l = reference.channel_constants([3], "paper")["half_l"][0]
    assert torch.tensor(half_l, dtype=torch.float32).item() == 0.9990000128746033
    assert reference.channel_constants([3], "paper")["shift"] == [0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_s3tokenizer_sweep_across_the_rounding_boundaries(backend):
    t = math.atanh(0.5 / 0.999)  # where a digit steps; the `atanh` variant steps 1.3e-3 lower
    torch.manual_seed(0)
    near = torch.linspace(t - 3e-3, t + 3e-3, 4000)
    z = torch.cat([near, -near, torch.randn(8000) * 2]).reshape(-1, 8)
    _, ids = fsq_kernels.quantize(z, S3_LEVELS, variant="paper", backend=backend)
    differs = ids != s3tokenizer_ids(z)
    # Two float32 implementations may round differently only inside the boundary window.
    window = boundary_window(S3_LEVELS, "paper", False)
    in_window = (reference.distance_to_rounding_boundary(z, S3_LEVELS, "paper") < window).any(-1)
    assert not (differs & ~in_window).any()
    assert differs.sum() <= 4
    # The sweep tells the variants apart: vector-quantize-pytorch's bound gives other ids.
    _, atanh_ids = fsq_kernels.quantize(z, S3_LEVELS, variant="atanh", backend=backend)
    assert (atanh_ids != s3tokenizer_ids(z)).sum() > 100


# -- NeMo: FiniteScalarQuantizer's own golden test, and the group layout --------------------------

# NVIDIA/NeMo tests/collections/tts/modules/test_audio_codec_modules.py,
# TestFiniteScalarQuantizer.test_fsq_output (snapshot 8cfedd7203462cb251a914e700e5605444277561;
# file last changed in 0fd4de534b7b6ad59271850904d0759deac3fd6a). Apache-2.0.
NEMO_LEVELS = [3, 4]
NEMO_INPUTS = [
    [[0.1483, -0.3855, -0.3715, -0.5913, -0.2212, -0.4226, -0.4864, -1.6069],
     [-0.5519, -0.5307, -0.5995, -1.9675, -0.4439, 0.3938, -0.5636, -0.3655]],
    [[0.5184, 1.4028, 0.1553, -0.2324, 1.0363, -0.4981, -0.1203, -1.0335],
     [-0.1567, -0.2274, 0.0424, -0.0819, -0.2122, -2.1851, -1.5035, -1.2237]],
    [[0.9497, 0.8510, -1.2021, 0.3299, -0.2388, 0.8445, 2.2129, -2.3383],
     [1.5331, 0.0399, -0.7676, -0.4715, -0.5713, 0.8761, -0.9755, -0.7479]],
    [[1.7243, -1.2146, -0.1969, 1.9261, 0.1109, 0.4028, 0.1240, -0.0994],
     [-0.3304, 2.1239, 0.1004, -1.4060, 1.1463, -0.0557, -0.5856, -1.2441]],
    [[2.3743, -0.1421, -0.4548, 0.6320, -0.2640, -0.3967, -2.5694, 0.0493],
     [0.3409, 0.2366, -0.0309, -0.7652, 0.3484, -0.8419, 0.9079, -0.9929]],
]
NEMO_DEQUANTIZED = [
    [[0, 0, 0, -1, 0, 0, 0, -1], [-0.5, -0.5, -0.5, -1, -0.5, 0, -0.5, -0.5]],
    [[0, 1, 0, 0, 1, 0, 0, -1], [0, 0, 0, 0, 0, -1, -1, -1]],
    [[1, 1, -1, 0, 0, 1, 1, -1], [0.5, 0, -0.5, -0.5, -0.5, 0.5, -0.5, -0.5]],
    [[1, -1, 0, 1, 0, 0, 0, 0], [0, 0.5, 0, -1, 0.5, 0, -0.5, -1]],
    [[1, 0, 0, 1, 0, 0, -1, 0], [0, 0, 0, -0.5, 0, -0.5, 0.5, -0.5]],
]
NEMO_INDICES = [[  # (D = 1 codebook, B, T)
    [4, 4, 4, 0, 4, 7, 4, 3],
    [7, 8, 7, 7, 8, 1, 1, 0],
    [11, 8, 3, 4, 4, 11, 5, 3],
    [8, 9, 7, 2, 10, 7, 4, 1],
    [8, 7, 7, 5, 7, 4, 9, 4],
]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemo_fsq_golden_output(backend):
    fsq = nemo.group_fsq(1, NEMO_LEVELS, backend=backend)
    inputs, input_len = torch.tensor(NEMO_INPUTS), torch.full((5,), 8)
    dequantized, indices = nemo.encode(fsq, inputs, input_len)
    assert dequantized.tolist() == NEMO_DEQUANTIZED
    assert indices.tolist() == NEMO_INDICES
    assert nemo.decode(fsq, indices, input_len).tolist() == NEMO_DEQUANTIZED


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_nemo_group_layout(num_groups):
    levels = [8, 7, 6, 6]
    assert reference.basis(levels) == [1, 8, 56, 336]
    fsq = nemo.group_fsq(num_groups, levels)
    torch.manual_seed(num_groups)
    inputs = torch.randn(3, 4 * num_groups, 11) * 2
    input_len = torch.tensor([11, 6, 0])
    dequantized, indices = nemo.encode(fsq, inputs, input_len)
    assert dequantized.shape == inputs.shape and indices.shape == (num_groups, 3, 11)
    # Contiguous groups: group g quantizes channels 4g..4g+3 alone, with the paper's bound.
    for g, chunk in enumerate(inputs.chunk(num_groups, dim=1)):
        codes, want = fsq_kernels.quantize(chunk, levels, variant="paper", channel_first=True)
        assert torch.equal(indices[g, 0], want[0])
        assert torch.equal(indices[g, 1, :6], want[1, :6])
        assert torch.equal(dequantized[:, 4 * g : 4 * g + 4][0], codes[0])
    # Frames at or past input_len are zero in both outputs, and decode keeps them zero.
    assert not indices[:, 1, 6:].any() and not indices[:, 2].any()
    assert not dequantized[1, :, 6:].any() and not dequantized[2].any()
    assert torch.equal(nemo.decode(fsq, indices, input_len), dequantized)


def test_nemo_adapter_errors():
    fsq = nemo.group_fsq(2, [8, 7, 6, 6])
    with pytest.raises(ValueError, match="input_len"):
        nemo.encode(fsq, torch.zeros(2, 8, 5), torch.tensor([5]))
    with pytest.raises(ValueError, match="G=2"):
        nemo.decode(fsq, torch.zeros(3, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="group_fsq"):
        nemo.encode(fsq_kernels.FSQ([8, 7, 6, 6]), torch.zeros(2, 4, 5))


# -- Cosmos: FSQuantizer's state_dict loads into the compat FSQ and matches vector-quantize-pytorch --

COSMOS_LEVELS = [8, 8, 8, 5, 5, 5]


def cosmos_fsquantizer_state_dict(dim: int) -> dict[str, torch.Tensor]:
    """The key layout of Cosmos-Tokenizer's FSQuantizer (cosmos_tokenizer/modules/quantizers.py):
    its level buffers are not persistent, so only the projections (dim != 6) appear."""
    if dim == len(COSMOS_LEVELS):
        return {}
    generator = torch.Generator().manual_seed(dim)
    d = len(COSMOS_LEVELS)
    return {
        "project_in.weight": torch.randn(d, dim, generator=generator) / math.sqrt(dim),
        "project_in.bias": torch.randn(d, generator=generator) * 0.1,
        "project_out.weight": torch.randn(dim, d, generator=generator) / math.sqrt(d),
        "project_out.bias": torch.randn(dim, generator=generator) * 0.1,
    }


@pytest.mark.parametrize("dim", [6, 16])
def test_cosmos_state_dict_loads_and_matches_the_peer(dim):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    state = cosmos_fsquantizer_state_dict(dim)
    ours, peer = CompatFSQ(COSMOS_LEVELS, dim=dim).eval(), vqp.FSQ(COSMOS_LEVELS, dim=dim).eval()
    ours.load_state_dict(state, strict=True)
    peer.load_state_dict(state, strict=True)
    assert ours.variant == "atanh" and ours.codebook_size == 64_000
    torch.manual_seed(0)
    z = torch.randn(2, dim, 6, 7) * 2  # Cosmos' latents are channel-first images or videos
    out_ours, idx_ours = ours(z)
    out_peer, idx_peer = peer(z)
    torch.testing.assert_close(out_ours, out_peer, rtol=1e-5, atol=1e-5)
    assert idx_ours.shape == idx_peer.shape == (2, 6, 7)
    x = ours.project_in(z.movedim(1, -1)).detach()
    in_window = (reference.distance_to_rounding_boundary(x, COSMOS_LEVELS, "atanh") < 1e-4).any(-1)
    assert not ((idx_ours != idx_peer) & ~in_window).any()
    torch.testing.assert_close(ours.indices_to_codes(idx_ours), peer.indices_to_codes(idx_peer), rtol=1e-5, atol=1e-5)
