"""Triton kernels for FSQ: forward (codes + indices; in training also the dither and the usage
histogram), straight-through backward (with the dither's mask), decode, and the fused residual
FSQ. Import this package only where Triton is importable; `fsq_kernels.ops.triton`
guards that and hands the launchers their constexpr payload."""

from .fsq import fsq_backward, fsq_decode, fsq_forward

__all__ = ["fsq_backward", "fsq_decode", "fsq_forward"]
