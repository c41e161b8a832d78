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


# The Triton backend's two ways of counting (fsq_kernels/triton/usage.py): a block histogram up to
# HIST_MAX_BINS (slot, code) bins, per-index global atomics beyond. Cases on both sides of the limit.
HIST_CASES = [  # levels, num_codebooks, bins = num_codebooks * prod(levels)
    ((4, 4, 4, 4, 4), 1, 1024),  # exactly at the limit: histogram
    ((5, 5, 41), 1, 1025),  # one above: per-index atomics
    ((4, 4, 4), 4, 256),  # several codebooks in one histogram
    ((3, 3, 3), 2, 54),  # few bins: the histogram's floor
    ((8, 5, 5, 5), 2, 2000),  # several codebooks beyond the limit
]


def test_histogram_limit_cases_cross_the_limit():
    from fsq_kernels.triton.usage import HIST_MAX_BINS, histogram_bins

    for levels, ncb, bins in HIST_CASES:
        assert ncb * math.prod(levels) == bins
        path = histogram_bins(bins)
        assert (path >= bins and path & (path - 1) == 0) if bins <= HIST_MAX_BINS else path == 0, (bins, path)
    assert {histogram_bins(b) > 0 for *_, b in HIST_CASES} == {True, False}


@pytest.mark.parametrize("backend,device", backend_params("quantize_train"))
@pytest.mark.parametrize("levels,num_codebooks,bins", HIST_CASES)
@pytest.mark.parametrize("channel_first", [False, True])
def test_histogram_paths_equal_bincount(backend, device, levels, num_codebooks, bins, channel_first):
    """Both Triton paths (and every other backend) in the fused forward and in accumulate_usage:
    skewed indices (a block counts the same bin many times), NaN tokens (-1), an odd token count."""
    gen = torch.Generator().manual_seed(bins)
    c = len(levels) * num_codebooks
    z = torch.randn((3, c, 7, 19) if channel_first else (3 * 7 * 19, c), generator=gen)
    z[:150] *= 0.05  # near zero: many tokens share the central code
    z.view(-1)[::11] = float("nan")
    z = z.to(device)
    _, indices, usage = ops.quantize_train(z, levels, channel_first=channel_first, num_codebooks=num_codebooks,
                                           return_usage=True, backend=backend)
    want = _bincount(indices, num_codebooks, math.prod(levels))  # indices are (..., num_codebooks) in both layouts
    assert torch.equal(usage.cpu(), want) and want.max() > 8 and (indices == -1).any()
    counts = torch.zeros_like(usage)
    ops.accumulate_usage(indices, counts, backend=backend)
    assert torch.equal(counts.cpu(), want)


_HIST_COMPILE_JOB = """
import json, torch
from tests.test_triton_static import _capture_launch, _compile_captured, _ptxas_report
from fsq_kernels.ops import tables
from fsq_kernels.ops.triton import payload
from fsq_kernels.triton import fsq, usage
out = []
def report(kernel, args, kwargs, bins_key, block_units, cc):
    ptx = _compile_captured(kernel, args, dict(kwargs), cc).asm["ptx"]
    out.append(dict(_ptxas_report(ptx, cc), cc=cc, bins=kwargs[bins_key], per_thread_units=block_units // 128,
                    global_atomics=ptx.count("atom.global") + ptx.count("red.global")))
for cc in (80, 90):
    for levels, ncb, channel_first, dtype in (((8, 5, 5, 5), 1, False, torch.float32), ((3,) * 6, 1, False, torch.float32),
                                              ((4, 4, 4), 4, True, torch.bfloat16), ((8, 5, 5, 5), 2, False, torch.float32)):
        d = len(levels)
        z = torch.empty((2, d * ncb, 32, 32) if channel_first else (8192, d * ncb), dtype=dtype, device="meta")
        cst = payload(levels, "paper", False, tuple(tables.quantize_table(levels, "paper", False, dtype)))
        counts = torch.empty(ncb, cst["NUM_CODES"], dtype=torch.int64, device="meta")
        k, _, a, kw = _capture_launch(fsq.fsq_forward, z, cst, fsq.PAPER, False, channel_first, ncb, True, usage=counts)
        report(k, a, kw, "HIST_BINS", kw["BLOCK"], cc)
    for shape, dtype in (((1, 1000), torch.int32), ((3, 45), torch.int64), ((2, 70000), torch.int64)):
        idx = torch.empty(1 << 20, dtype=dtype, device="meta")
        k, _, a, kw = _capture_launch(usage.accumulate_usage, idx, torch.empty(shape, dtype=torch.int64, device="meta"))
        report(k, a, kw, "NUM_BINS", kw["BLOCK"], cc)
print(json.dumps(out))
"""


def test_histogram_paths_compile_without_spills():
    """Both counting paths of both Triton kernels compile for sm_80 and sm_90 (the real compiler,
    not the interpreter) with no spills, and issue the global atomics they should: one per bin
    of the histogram (NUM_BINS / 128 threads each) or one per unit (per-index path)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _HIST_COMPILE_JOB], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["bins"] for r in reports[:7]] == [1024, 1024, 256, 0, 1024, 256, 0]
    for r in reports:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["global_atomics"] == (r["bins"] // 128 if r["bins"] else r["per_thread_units"]), r
