"""Codebook-usage histograms (issue 16 part 5): the one counted by the quantize kernel in its
pass (quantize_train(return_usage=True), what FSQ(track_usage=True) uses) and the standalone
accumulate_usage (held-out evaluation), both equal to bincount on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import fsq_kernels
from fsq_kernels import ops
from fsq_kernels.ops import backends

from .conftest import TEST_DEVICE, backend_params

BACKENDS = ["reference"] + [name for name in ("cpp", "cuda", "triton")
                            if name in ops.available_backends() and backends.runs_on(name, TEST_DEVICE)]


def _bincount(indices, groups, size):
    flat = indices.reshape(-1, groups) if groups > 1 else indices.reshape(-1, 1)
    out = torch.zeros(groups, size, dtype=torch.int64)
    for g in range(groups):
        v = flat[:, g].cpu().to(torch.int64)
        v = v[(v >= 0) & (v < size)]
        out[g] = torch.bincount(v, minlength=size)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups,size,dtype", [(1, 1000, torch.int32), (3, 45, torch.int64), (2, 70000, torch.int32),
                                               (1, 7, torch.int64)])
def test_counts_equal_bincount(backend, groups, size, dtype):
    """Includes -1 (NaN tokens) and out-of-range values (skipped), several calls accumulating, and a
    codebook beyond the CPU per-thread tables (2 x 70000 bins: the atomic fallback)."""
    gen = torch.Generator().manual_seed(size)
    counts = torch.zeros(groups, size, dtype=torch.int64, device=TEST_DEVICE)
    want = torch.zeros(groups, size, dtype=torch.int64)
    for n in (50_000, 3, 0):
        shape = (n // groups, groups) if groups > 1 else (n,)
        indices = torch.randint(-1, size + 1, shape, generator=gen).to(dtype).to(TEST_DEVICE)
        ops.accumulate_usage(indices, counts, backend=backend)
        want += _bincount(indices, groups, size)
    assert torch.equal(counts.cpu(), want)


@pytest.mark.parametrize("backend,device", backend_params("quantize_train"))
@pytest.mark.parametrize("levels,shape,channel_first,num_codebooks", [
    ((8, 5, 5, 5), (3, 37, 8), False, 2),  # odd token count, two codebooks
    ((7, 5, 5, 5, 5), (2, 15, 5, 3), True, 3),  # channel-first, three codebooks
    ((300, 7), (101, 2), False, 1),  # Triton's tanh path; 2100 bins
    ((4, 3), (0, 2), False, 1),  # empty
])
def test_forward_histogram_equals_bincount(backend, device, levels, shape, channel_first, num_codebooks):
    """The histogram the quantize kernel counts in its pass: NaN tokens (index -1) skipped,
    a fresh zeroed table per call."""
    gen = torch.Generator().manual_seed(len(levels))
    z = torch.randn(shape, generator=gen) * 2
    if z.numel():
        z.view(-1)[::7] = float("nan")
    z = z.to(device)
    for _ in range(2):
        _, indices, usage = ops.quantize_train(z, levels, channel_first=channel_first, num_codebooks=num_codebooks,
                                               return_usage=True, backend=backend)
        assert usage.dtype == torch.int64 and usage.device == z.device
        assert torch.equal(usage.cpu(), _bincount(indices, num_codebooks, math.prod(levels)))
    assert not z.numel() or (indices == -1).any()


def test_cpp_uses_the_fused_op():
    if "cpp" not in BACKENDS or TEST_DEVICE != "cpu":
        pytest.skip("cpp backend not available")
    assert hasattr(torch.ops.fsq, "accumulate_usage")


def test_module_tracks_training_batches_only():
    fsq = fsq_kernels.FSQ([8, 5, 5, 5], num_codebooks=2, track_usage=True).to(TEST_DEVICE)
    z = torch.randn(64, 8, device=TEST_DEVICE)
    _, indices = fsq(z)
    _, _ = fsq(z)
    assert torch.equal(fsq.usage_counts.cpu(), 2 * _bincount(indices, 2, 1000))
    fsq.eval()
    fsq(z)
    assert int(fsq.usage_counts.sum()) == 2 * 64 * 2
    p = fsq.usage_counts[0].double() / fsq.usage_counts[0].sum()
    want = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    assert fsq.perplexity()[0].item() == pytest.approx(want, rel=1e-6)
    assert fsq.usage()[0].item() == (fsq.usage_counts[0] > 0).float().mean().item()
    fsq.reset_usage()
    assert int(fsq.usage_counts.sum()) == 0 and fsq.perplexity().tolist() == [1.0, 1.0]
    assert "usage_counts" not in fsq.state_dict()  # the peer's state_dict keys stay the same


def test_errors():
    with pytest.raises(ValueError, match="counts"):
        ops.accumulate_usage(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dim"):
        ops.accumulate_usage(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.accumulate_usage(torch.zeros(3), torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="track_usage"):
        fsq_kernels.FSQ([5, 5], track_usage=True, return_indices=False)
