"""The quantizer modules, with vector-quantize-pytorch's interfaces: FSQ, ResidualFSQ and
GroupedResidualFSQ."""

from .fsq import FSQ
from .residual import GroupedResidualFSQ, ResidualFSQ

__all__ = ["FSQ", "GroupedResidualFSQ", "ResidualFSQ"]
