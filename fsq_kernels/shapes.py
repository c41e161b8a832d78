"""Shapes and dtypes of the index and decode tensors: one rule, used by the fake (meta)
implementations of the ops and by the Triton launchers (the C++ ops mirror it in csrc/fsq_common.h).

* quantize: indices have z's shape without the channel axis (dim 1 channel-first, the last one
  channel-last), plus a trailing num_codebooks axis when num_codebooks > 1.
* indices_to_codes: the inverse, codes channel-last (..., C) or channel-first (B, C, ...).
* residual_quantize: x's shape with the channel axis replaced by the stage axis.
* index dtype: int32 while prod(levels) <= 2^31 - 1, int64 beyond.
"""

from __future__ import annotations

from typing import Sequence

import torch

INT32_MAX = 2**31 - 1

__all__ = ["decode_shape", "index_dtype", "index_shape", "residual_index_shape", "token_shape"]


def index_dtype(levels: Sequence[int]) -> torch.dtype:
    size = 1
    for level in levels:
        size *= int(level)
    return torch.int32 if size <= INT32_MAX else torch.int64


def token_shape(shape: Sequence[int], channel_first: bool) -> tuple:
    """z's shape without its channel axis."""
    shape = tuple(shape)
    return (shape[0],) + shape[2:] if channel_first else shape[:-1]


def index_shape(shape: Sequence[int], channel_first: bool, num_codebooks: int) -> tuple:
    return token_shape(shape, channel_first) + ((int(num_codebooks),) if num_codebooks > 1 else ())


def decode_shape(shape: Sequence[int], levels: Sequence[int], channel_first: bool, num_codebooks: int) -> tuple:
    """Codes of an index tensor of `shape`: the inverse of index_shape."""
    tokens = tuple(shape[:-1]) if num_codebooks > 1 else tuple(shape)
    channels = len(levels) * int(num_codebooks)
    return (tokens[0], channels) + tokens[1:] if channel_first else tokens + (channels,)


def residual_index_shape(shape: Sequence[int], channel_first: bool, num_stages: int) -> tuple:
    out = list(shape)
    out[1 if channel_first else len(out) - 1] = int(num_stages)
    return tuple(out)
