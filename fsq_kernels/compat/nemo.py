"""NeMo's group FSQ layout on fsq_kernels (GroupFiniteScalarQuantizer in NeMo's
nemo/collections/tts/modules/audio_codec_modules.py, used by its audio codecs).

NeMo quantizes channel-first inputs (B, D, T) with D = num_groups * len(levels), split into
contiguous groups (fsq_kernels' num_codebooks), with the paper's bound (tan shift, scale
(L-1)(1-eps)/2, eps = 1e-3: the `paper` variant). Its indices are (G, B, T), and frames at or past
input_len are zeroed in both outputs: index 0 there is padding, not a code.

    fsq = group_fsq(num_groups=2, levels=[8, 7, 6, 6])
    dequantized, indices = encode(fsq, inputs, input_len)   # (B, D, T), (G, B, T)
    dequantized = decode(fsq, indices, input_len)

NeMo's own codes_to_indices truncates a float32 sum; per channel that is exact for every L <= 25
(all levels NeMo ships) but not for some larger ones (L = 26, 27, 38, ...), where fsq_kernels'
indices stay exact.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..nn import FSQ

__all__ = ["decode", "encode", "group_fsq"]


def group_fsq(num_groups: int, levels: Sequence[int], backend: str = "auto") -> FSQ:
    """The FSQ module NeMo's GroupFiniteScalarQuantizer(num_groups, levels) computes (no parameters)."""
    return FSQ(levels, num_codebooks=num_groups, keep_num_codebooks_dim=True, channel_first=True, variant="paper", backend=backend)


def _zero_past(x: Tensor, input_len: Tensor | None, batch_dim: int = 0) -> Tensor:
    """Zero the frames t >= input_len[b] of x (time last), as NeMo's mask_sequence_tensor does."""
    if input_len is None:
        return x
    batch = x.shape[batch_dim]
    if input_len.shape != (batch,):
        raise ValueError(f"input_len must have shape ({batch},) (one length per batch element); got {tuple(input_len.shape)}")
    valid = torch.arange(x.shape[-1], device=x.device) < input_len.to(x.device).unsqueeze(-1)  # (B, T)
    shape = [1] * x.dim()
    shape[batch_dim], shape[-1] = batch, x.shape[-1]
    return torch.where(valid.view(shape), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check(fsq: FSQ) -> None:
    if not (fsq.channel_first and fsq.keep_num_codebooks_dim and not fsq.has_projections and not fsq.orthogonal_rotation):
        raise ValueError("fsq must be built by group_fsq(...) (channel-first, no projections or rotation)")


def encode(fsq: FSQ, inputs: Tensor, input_len: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """inputs (B, D, T) -> (dequantized (B, D, T), indices (G, B, T)), NeMo's forward."""
    _check(fsq)
    if inputs.dim() != 3:
        raise ValueError(f"inputs must be (B, D, T); got shape {tuple(inputs.shape)}")
    dequantized, indices = fsq(inputs)  # indices (B, T, G)
    return _zero_past(dequantized, input_len), _zero_past(indices.movedim(-1, 0), input_len, batch_dim=1)


def decode(fsq: FSQ, indices: Tensor, input_len: Tensor | None = None) -> Tensor:
    """indices (G, B, T) -> dequantized (B, D, T), NeMo's decode."""
    _check(fsq)
    if indices.dim() != 3 or indices.shape[0] != fsq.num_codebooks:
        raise ValueError(f"indices must be (G={fsq.num_codebooks}, B, T); got shape {tuple(indices.shape)}")
    return _zero_past(fsq.indices_to_codes(indices.movedim(0, -1)), input_len)
