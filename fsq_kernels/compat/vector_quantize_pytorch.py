"""A look-alike of vector_quantize_pytorch's FSQ: replace

    from vector_quantize_pytorch import FSQ

with

    from fsq_kernels.compat.vector_quantize_pytorch import FSQ

and a model trained with vector-quantize-pytorch gives the same outputs and indices (state_dict
keys are the same). It keeps the peer's defaults (the `atanh` bound), its asserts and its shape
rules (an input of 4 or more dims is channel-first), and runs on fsq_kernels' fused backends.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import nn as fsq_nn

__all__ = ["FSQ", "CompatAssertionError", "GroupedResidualFSQ", "ResidualFSQ"]

# The residual classes already have the peer's constructor, defaults and shape rules.
ResidualFSQ = fsq_nn.ResidualFSQ
GroupedResidualFSQ = fsq_nn.GroupedResidualFSQ


class CompatAssertionError(AssertionError, ValueError):
    """Raised where vector-quantize-pytorch asserts; also a ValueError, like fsq_kernels' errors."""


class FSQ(fsq_nn.FSQ):
    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        *,
        backend: str = "auto",
    ):
        if any(level == 2 for level in levels) and not preserve_symmetry:
            raise CompatAssertionError(
                "turn on `preserve_symmetry` for using any levels == 2, or use a greater level"
            )
        if noise_dropout > 0 and not preserve_symmetry:
            raise CompatAssertionError("noise_dropout > 0 needs preserve_symmetry=True")
        super().__init__(
            levels, dim, num_codebooks, keep_num_codebooks_dim, scale, allowed_dtypes, channel_first,
            projection_has_bias, return_indices, force_quantization_f32, preserve_symmetry, noise_dropout,
            bound_hard_clamp, orthogonal_rotation,
            variant="symmetric" if preserve_symmetry else "atanh", backend=backend,
        )

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        # The peer treats images and video (4+ dims) as channel-first whatever channel_first says.
        return self._forward(z, channel_first=z.dim() >= 4 or self.channel_first)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        return self._decode(indices, channel_first=is_img_or_video or self.channel_first)
