"""The fused usage histogram's cost: the FSQ forward (quantize with indices) alone; the forward
that counts the histogram in its own pass (ops.quantize_train(return_usage=True), what
FSQ(track_usage=True) runs, plus the add_ into a persistent (1, K) int64 table); the forward then
ops.accumulate_usage (a second fused pass over the indices, what held-out evaluation uses); and the
forward then a torch.bincount. Same tensors, median of interleaved repetitions. Issue 16's target:
at most 15% over the plain forward at 2^22 tokens, levels [8, 5, 5, 5], on CPU.

    python -m benchmarks.usage [--log2-tokens 22] [--reps 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import fsq_kernels
from fsq_kernels import ops

LEVELS = (8, 5, 5, 5)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(log2_tokens: int, reps: int, device: str) -> dict:
    z = torch.randn(2**log2_tokens, len(LEVELS), generator=torch.Generator().manual_seed(0)).to(device)
    counts = torch.zeros(1, 1000, dtype=torch.int64, device=device)
    bincounts = torch.zeros(1, 1000, dtype=torch.int64, device=device)

    def plain():
        return fsq_kernels.quantize(z, LEVELS)

    def in_kernel():
        _, _, usage = ops.quantize_train(z, LEVELS, return_usage=True)
        counts.add_(usage)

    def second_pass():
        _, indices = fsq_kernels.quantize(z, LEVELS)
        ops.accumulate_usage(indices, counts)

    def bincount():  # what a training loop does without the fused op
        _, indices = fsq_kernels.quantize(z, LEVELS)
        bincounts.add_(torch.bincount(indices.reshape(-1).long(), minlength=1000).view(1, -1))

    fns = {"forward": plain, "forward with fused histogram": in_kernel,
           "forward + accumulate_usage": second_pass, "forward + bincount": bincount}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():  # interleaved: load changes hit every variant alike
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    _, indices, usage = ops.quantize_train(z, LEVELS, return_usage=True)
    check = torch.zeros_like(counts)
    ops.accumulate_usage(indices, check)
    want = torch.bincount(indices.reshape(-1).long(), minlength=1000)
    assert torch.equal(check.view(-1), want) and torch.equal(usage.view(-1), want)
    medians = {name: statistics.median(t) for name, t in times.items()}
    backend = ops.resolve("auto", z.device, z.dtype, LEVELS, "benchmarks.usage", "quantize_train").__name__
    return {"tokens": 2**log2_tokens, "device": device, "medians_ms": medians,
            "fused_backend": backend.rsplit(".", 1)[-1].lstrip("_"),
            "overhead": {name: ms / medians["forward"] - 1 for name, ms in medians.items()}}


def to_markdown(result: dict, reps: int) -> str:
    lines = [f"# Fused usage histogram: {result['tokens']} tokens, levels {list(LEVELS)}, {result['device']}, "
             f"median of {reps} interleaved repetitions (quantize_train ran on the "
             f"{result['fused_backend']!r} backend module)", "",
             "| variant | median ms | over forward |", "|---|---|---|"]
    for name, ms in result["medians_ms"].items():
        lines.append(f"| {name} | {ms:.2f} | {result['overhead'][name]:+.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log2-tokens", type=int, default=22)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None, help="folder for usage.md (default: print only)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = to_markdown(measure(args.log2_tokens, args.reps, device), args.reps)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "usage.md").write_text(text)


if __name__ == "__main__":
    main()
