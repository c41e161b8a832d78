"""The codebook-usage histogram of the Triton backend: the counting step both kernels share
(`_count_usage`, called by the fused forward of fsq.py under its USAGE constexpr,
fsq_triton::quantize_train, and by `_usage_kernel` here) and the standalone kernel
(fsq_triton::accumulate_usage): counts (G, K) int64 += the histogram of the indices, element e in
codebook slot e % G, indices outside [0, K) skipped.

How a program counts its block of (slot * K + index) bins, chosen at launch by `histogram_bins`:
* G*K <= HIST_MAX_BINS: `tl.histogram` over the block into NUM_BINS (a power of two >= G*K,
  at least HIST_MIN_BINS) int32 bins, then one relaxed int64 global atomic add per non-zero bin:
  a code that many tokens of a block share costs one global atomic, not one per token.
* beyond: one relaxed global atomic add per valid index (as the CUDA backend does beyond its
  shared table).
Why HIST_MAX_BINS = 1024: triton 3.6 lowers tl.histogram to warp ballots in which every thread
keeps NUM_BINS/32 counters in registers and updates them for every element (ptxas, sm_90: 72-96
registers at 1024 bins, 126-128 at 2048, 168 bytes of spills in `_usage_kernel` at 4096);
triton 3.8 to shared-memory atomics (no extra registers) whose zeroing and flush cost
NUM_BINS/128 steps per thread, against the 128-1024 units of a block. Both releases divide out
the copies of a replicated input (the forward's indices are a channel reduction). 1024 keeps
either lowering spill-free (tests/test_usage.py compiles both paths for sm_80/sm_90) and holds
the [8,5,5,5] codebook; larger tables keep the per-index atomics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _identity

BLOCK = 1024
HIST_MAX_BINS = 1024  # block histogram up to this many (slot, code) bins; why: the docstring
HIST_MIN_BINS = 128  # one bin per thread of the launchers' 4 warps: no replicated lanes in the flush


def histogram_bins(bins: int) -> int:
    """The NUM_BINS constexpr of `_count_usage` for a (G, K) table of `bins` = G*K entries:
    a power of two >= bins for the block histogram, 0 (per-index global atomics) beyond
    HIST_MAX_BINS."""
    return max(HIST_MIN_BINS, triton.next_power_of_2(bins)) if bins <= HIST_MAX_BINS else 0


@triton.jit
def _count_usage(counts_ptr, bins, valid, NUM_BINS: tl.constexpr):
    """counts[bins[i]] += 1 for every i with valid[i] (bins: int64 offsets into the int64 table).
    NUM_BINS > 0 (every valid bin is below it): the block's histogram, then one atomic per
    non-zero bin; NUM_BINS == 0: one atomic per valid element."""
    if NUM_BINS > 0:
        hist = tl.histogram(bins.to(tl.int32), NUM_BINS, mask=valid)
        tl.atomic_add(counts_ptr + tl.arange(0, NUM_BINS), hist.to(tl.int64), mask=hist > 0, sem="relaxed")
    else:
        tl.atomic_add(counts_ptr + bins, valid.to(tl.int64), mask=valid, sem="relaxed")


@triton.jit
def _usage_kernel(idx_ptr, counts_ptr, n, G, K, BLOCK: tl.constexpr, NUM_BINS: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < n
    v = tl.load(idx_ptr + e, mask=mask, other=-1).to(tl.int64)
    valid = mask & (v >= 0) & (v < K)
    _count_usage(counts_ptr, (e % G) * K + v, valid, NUM_BINS)


def accumulate_usage(indices: torch.Tensor, counts: torch.Tensor, wrap=_identity) -> None:
    indices = indices.contiguous()
    n = indices.numel()
    if n:
        groups, size = counts.shape
        wrap(_usage_kernel)[(triton.cdiv(n, BLOCK),)](indices, counts, n, groups, size, BLOCK=BLOCK,
                                                      NUM_BINS=histogram_bins(groups * size))
