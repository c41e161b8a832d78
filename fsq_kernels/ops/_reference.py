"""The reference backend: fsq_kernels.reference behind the same interface as the fused backends,
so the op layer dispatches every backend the same way (docs/design.md, "Backends")."""

from __future__ import annotations

from torch import Tensor

from .. import reference

__all__ = ["indices_to_codes", "is_available", "quantize", "residual_quantize", "supports"]


def is_available(device_type: str) -> bool:
    return True


def supports(levels: tuple[int, ...]) -> bool:
    """Any level set: the reference is the fallback for every other backend's limits."""
    return True


def quantize(z: Tensor, levels, variant, hard_clamp, channel_first, num_codebooks, return_indices):
    return reference.quantize(
        z, levels, variant=variant, hard_clamp=hard_clamp, channel_first=channel_first,
        num_codebooks=num_codebooks, return_indices=return_indices,
    )


def indices_to_codes(indices: Tensor, levels, variant, channel_first, num_codebooks, dtype):
    return reference.indices_to_codes(
        indices, levels, variant=variant, channel_first=channel_first, num_codebooks=num_codebooks, dtype=dtype
    )


def residual_quantize(x: Tensor, levels, num_stages, hard_clamp, soft_clamp, channel_first, active_stages):
    return reference.residual_quantize(
        x, levels, num_stages, hard_clamp=hard_clamp, soft_clamp=soft_clamp,
        channel_first=channel_first, active_stages=active_stages,
    )
