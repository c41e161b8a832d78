#!/usr/bin/env python
"""CPU timing of the C++ kernels against one allocating torch.tanh and vector-quantize-pytorch.

Interleaved providers, median of --reps runs each (DESIGN.md section 4: absolute times on shared
machines are noise, ratios within one run are the result). Also counts the ATen ops dispatched
per forward+backward of our path (each would be a kernel launch on a GPU).

    python scripts/bench_native.py                 # 2 threads, [8,5,5,5], 2^22 tokens, fp32
    python scripts/bench_native.py --tokens 65536 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fsq_kernels.ops import native


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2**22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--levels", type=int, nargs="+", default=[8, 5, 5, 5])
    args = parser.parse_args()
    if not native.is_available("cpu"):
        raise SystemExit("fsq_kernels._C is not built")
    torch.set_num_threads(args.threads)
    levels = tuple(args.levels)
    d = len(levels)
    z = torch.randn(1, args.tokens, d)
    zg = z.clone().requires_grad_(True)
    g = torch.randn_like(z)

    def ours_fwd():
        return native.quantize(z, levels, "paper", False, False, 1, True)

    def ours_fwd_bwd():
        codes, _ = native.quantize(zg, levels, "paper", False, False, 1, True)
        return torch.autograd.grad(codes, zg, g)

    providers = {"ours fwd": ours_fwd, "ours fwd+bwd": ours_fwd_bwd, "torch.tanh": lambda: torch.tanh(z)}
    try:
        from vector_quantize_pytorch import FSQ

        vqp = FSQ(levels=list(levels))

        def vqp_fwd():
            with torch.no_grad():
                return vqp(z)

        def vqp_fwd_bwd():
            out, _ = vqp(zg)
            return torch.autograd.grad(out, zg, g)

        providers["vqp fwd"] = vqp_fwd
        providers["vqp fwd+bwd"] = vqp_fwd_bwd
    except ImportError:
        print("vector-quantize-pytorch not installed: peer skipped")

    for f in providers.values():  # warm-up
        f()
    times = {k: [] for k in providers}
    for _ in range(args.reps):
        for name, f in providers.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"levels {list(levels)}, {args.tokens} tokens, fp32, {args.threads} threads, median of {args.reps}")
    for name, ms in med.items():
        print(f"  {name:14s} {ms:8.1f} ms")
    tanh = med["torch.tanh"]
    print(f"  ours fwd / tanh            = {med['ours fwd'] / tanh:.2f}x")
    print(f"  ours fwd+bwd / tanh        = {med['ours fwd+bwd'] / tanh:.2f}x")
    if "vqp fwd" in med:
        print(f"  vqp fwd / ours fwd         = {med['vqp fwd'] / med['ours fwd']:.1f}x faster")
        print(f"  vqp fwd+bwd / ours fwd+bwd = {med['vqp fwd+bwd'] / med['ours fwd+bwd']:.1f}x faster")

    small = torch.randn(4, 16, d, requires_grad=True)
    with CountOps() as counter:
        codes, _ = native.quantize(small, levels, "paper", False, False, 1, True)
        torch.autograd.grad(codes, small, torch.ones_like(codes))
    print(f"  ATen ops per forward+backward (ours, incl. the ones_like grad): {len(counter.ops)}: {counter.ops}")


if __name__ == "__main__":
    main()
