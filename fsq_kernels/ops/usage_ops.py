"""The fused codebook-usage histogram: `fsq::accumulate_usage` (C++ CPU: per-thread tables, CUDA:
shared-memory atomics; csrc/fsq_usage.cpp), `fsq_triton::accumulate_usage`
(fsq_kernels/triton/usage.py), and the reference (a bincount). Schema, both namespaces:

    accumulate_usage(Tensor indices, Tensor(a!) counts) -> ()

counts (G, K) int64 on indices' device += the histogram of indices (element e in slot e % G, G the
indices' last dim when G > 1); indices outside [0, K) (-1: NaN tokens, dropped stages) are skipped.
It runs on the device with no host sync, so a training step can accumulate every batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _reference, backends, native

__all__ = ["accumulate_usage", "perplexity", "usage_fraction"]

_triton_module = backends.module("triton") if "triton" in backends._MODULES else None

if _triton_module is not None:
    from torch.library import triton_op

    from ..triton import usage as _kernels
    from .triton import _wrap

    @triton_op("fsq_triton::accumulate_usage", mutates_args={"counts"})
    def _accumulate_usage_op(indices: Tensor, counts: Tensor) -> None:
        _kernels.accumulate_usage(indices, counts, wrap=_wrap(indices))


def accumulate_usage(indices: Tensor, counts: Tensor, *, backend: str = "auto") -> None:
    """counts (G, K) int64 += the per-code histogram of `indices` (int32/int64, last dim G when
    G > 1), in place, in one fused kernel; indices outside [0, K) are skipped."""
    caller = "fsq_kernels.accumulate_usage"
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{caller}: indices must be an int32 or int64 tensor; got "
                        f"{indices.dtype if isinstance(indices, Tensor) else type(indices).__name__}")
    if not isinstance(counts, Tensor) or counts.dtype != torch.int64 or counts.dim() != 2 or not counts.is_contiguous():
        raise ValueError(f"{caller}: counts must be a contiguous int64 tensor of shape (G, K); got "
                         f"{getattr(counts, 'dtype', type(counts).__name__)} of shape {tuple(getattr(counts, 'shape', ()))}")
    if counts.device != indices.device:
        raise ValueError(f"{caller}: counts must be on indices' device {indices.device}; got {counts.device}")
    if counts.shape[0] > 1 and (indices.dim() == 0 or indices.shape[-1] != counts.shape[0]):
        raise ValueError(f"{caller}: indices' last dim must be counts.shape[0] = {counts.shape[0]}; got shape "
                         f"{tuple(indices.shape)}")
    runner = backends.resolve(backend, indices.device, torch.float32, (2,), caller)
    if runner is native and native._C is not None and hasattr(torch.ops.fsq, "accumulate_usage"):
        torch.ops.fsq.accumulate_usage(indices, counts)
    elif runner is not _reference and runner is _triton_module:
        torch.ops.fsq_triton.accumulate_usage(indices, counts)
    else:
        counts.add_(_reference.histogram(indices, *counts.shape))


def usage_fraction(counts: Tensor) -> Tensor:
    """Fraction of each codebook's codes seen at least once: (G,) float32."""
    return (counts > 0).to(torch.float32).mean(dim=-1)


def perplexity(counts: Tensor) -> Tensor:
    """exp of the entropy of each codebook's code distribution, (G,) float32 (1 for no counts)."""
    p = counts.to(torch.float64) / counts.sum(dim=-1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=-1)
    return entropy.exp().to(torch.float32)
