"""fsq-kernels: fast, exact Finite Scalar Quantization (Mentzer et al., 2023) for PyTorch."""

__version__ = "0.1.0"

from . import reference
from .nn import FSQ, GroupedResidualFSQ, ResidualFSQ
from .ops import (
    accumulate_usage,
    available_backends,
    codes_to_indices,
    indices_to_codes,
    quantize,
    quantize_train,
    residual_quantize,
)

__all__ = [
    "FSQ",
    "GroupedResidualFSQ",
    "ResidualFSQ",
    "__version__",
    "accumulate_usage",
    "available_backends",
    "codes_to_indices",
    "indices_to_codes",
    "quantize",
    "quantize_train",
    "residual_quantize",
    "reference",
]
