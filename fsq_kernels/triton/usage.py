"""Triton kernel of the fused codebook-usage histogram (fsq_triton::accumulate_usage): counts
(G, K) int64 += the histogram of the indices, element e in codebook slot e % G, indices outside
[0, K) skipped; one global atomic add per valid index."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _usage_kernel(idx_ptr, counts_ptr, n, G, K, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < n
    v = tl.load(idx_ptr + e, mask=mask, other=-1).to(tl.int64)
    valid = mask & (v >= 0) & (v < K)
    tl.atomic_add(counts_ptr + (e % G) * K + v, tl.full([BLOCK], 1, tl.int64), mask=valid)


def _identity(kernel):
    return kernel


def accumulate_usage(indices: torch.Tensor, counts: torch.Tensor, wrap=_identity) -> None:
    indices = indices.contiguous()
    n = indices.numel()
    if n:
        wrap(_usage_kernel)[(triton.cdiv(n, BLOCK),)](indices, counts, n, counts.shape[0], counts.shape[1], BLOCK=BLOCK)
