"""Triton kernels for FSQ: forward (codes + indices), straight-through backward, decode.

Import this package only where Triton is importable; `fsq_kernels.ops.triton` guards that.
"""

from .fsq import fsq_backward, fsq_decode, fsq_forward, level_constants

__all__ = ["fsq_backward", "fsq_decode", "fsq_forward", "level_constants"]
