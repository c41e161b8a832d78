"""A look-alike of vector_quantize_pytorch's FSQ: replace

    from vector_quantize_pytorch import FSQ

with

    from fsq_kernels.compat.vector_quantize_pytorch import FSQ

and a model trained with vector-quantize-pytorch gives the same outputs and indices (state_dict
keys are the same). It keeps the peer's defaults (the `atanh` bound), its asserts and its shape
rules (an input of 4 or more dims is channel-first), and runs on fsq_kernels' fused backends.

It copies the peer (1.32) except where the peer's behaviour is a bug we chose to fix:
- with orthogonal_rotation=True and no projections, codes_to_indices undoes the rotation, so
  codes_to_indices(indices_to_codes(i)) == i (as the peer's main-branch tests expect; 1.32 fails);
- codes_to_indices snaps each code to the grid: bf16 codes keep their indices past 256 codes;
- ResidualFSQ / GroupedResidualFSQ with is_channel_first=True decode the (B, Q, ...) and
  (G, B, Q, ...) indices their forward returns (1.32 raises on them);
- bound(z, eps) accepts only the default eps=1e-3 (the kernels' constant); others are a ValueError.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import nn as fsq_nn
from .. import ops, reference

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

    # The peer's public quantizer steps (1.32): each returns the code, rounded with a straight-through
    # gradient and normalised, channel-last (..., codebook_dim); `bound` is not just the bound.

    def _codes(self, z: Tensor, variant: str, hard_clamp: bool) -> Tensor:
        if z.dim() == 0 or z.shape[-1] != self.codebook_dim:
            raise ValueError(f"FSQ: z must be channel-last with codebook_dim={self.codebook_dim} channels; got shape {tuple(z.shape)}")
        return ops.quantize(z, self.levels, variant=variant, hard_clamp=hard_clamp, return_indices=False, backend=self.backend)[0]

    def bound(self, z: Tensor, eps: float = reference.EPS, hard_clamp: bool = False) -> Tensor:
        """The `atanh` code: round(tanh(z + atanh(o/h)) * h - o) / (L // 2), h = (L-1)(1+eps)/2."""
        if eps != reference.EPS:
            raise ValueError(f"FSQ.bound: eps must be {reference.EPS} (the kernels' constant); got {eps}")
        return self._codes(z, "atanh", hard_clamp)

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        """The `symmetric` code: 2/(L-1) * floor((L-1)(tanh z + 1)/2 + 1/2) - 1 (arXiv 2411.19842)."""
        return self._codes(z, "symmetric", hard_clamp)

    def quantize(self, z: Tensor) -> Tensor:
        """z (..., codebook_dim) -> codes: the module's bound with its bound_hard_clamp."""
        bound_fn = self.symmetry_preserving_bound if self.preserve_symmetry else self.bound
        return bound_fn(z, hard_clamp=self.bound_hard_clamp)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        # The peer treats images and video (4+ dims) as channel-first whatever channel_first says.
        return self._forward(z, channel_first=z.dim() >= 4 or self.channel_first)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        return self._decode(indices, channel_first=is_img_or_video or self.channel_first)
