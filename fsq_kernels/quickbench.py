"""`python -m fsq_kernels bench`: a short built-in benchmark of our backends against the reference
and the floor, with no peer installed.

The floor of an op is its minimal bytes (read once, written once) at the bandwidth of a plain
device-to-device copy of the same input, measured in the same run; `x floor` is time / floor
(1.0 = as fast as copying the bytes). On CUDA the times come from triton.testing.do_bench (median)
when triton is installed, else from CUDA events; on CPU, from the median of timed repetitions.
For the full comparison with vector-quantize-pytorch and torch.compile, run
`python -m benchmarks.report` from a source checkout (pip install -e ".[bench]").
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable

import torch

import fsq_kernels

from . import reference
from .envinfo import backends_on

__all__ = ["format_rows", "run_bench"]

FULL_REPORT = "python -m benchmarks.report"


def _timer(device_type: str, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    if device_type == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn: float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))
        except ImportError:
            return lambda fn: _cuda_events(fn, rep_ms)
    return lambda fn: _cpu_median(fn, rep_ms)


def _cpu_median(fn, rep_ms: int) -> float:
    fn()  # warm-up (first-call allocations, thread pool start)
    times, spent = [], 0.0
    while len(times) < 3 or (spent < rep_ms / 1e3 and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times) * 1e3


def _cuda_events(fn, rep_ms: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(5, rep_ms // 5)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _input(levels, tokens: int, dtype, channel_first: bool, device) -> torch.Tensor:
    d = len(levels)
    if channel_first:
        side = max(1, int((tokens // 16) ** 0.5))
        return torch.randn(16, d, side, side, device=device, dtype=dtype)
    return torch.randn(tokens, d, device=device, dtype=dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _cases(device_type: str, tokens: int, quick: bool):
    """(op, levels, dtype, channel_first, tokens) to time."""
    level_sets = ((8, 5, 5, 5),) if quick else ((8, 5, 5, 5), (8, 8, 8, 5, 5, 5))
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    for levels, dtype, cf in itertools.product(level_sets, dtypes, (False, True)):
        for op in ("forward", "forward+backward", "decode"):
            yield op, levels, dtype, cf, tokens
    yield "residual x8", (8, 5, 5, 5), torch.float32, False, tokens
    if device_type == "cuda":
        yield "forward (latency)", (8, 5, 5, 5), torch.float32, False, 1024


def _workload(op, levels, dtype, cf, z, backend):
    """(callable, minimal bytes moved) for one backend on input z."""
    index_size = torch.empty((), dtype=reference.index_dtype(levels)).element_size()
    tokens = z.numel() // len(levels)
    if op.startswith("forward") and op != "forward+backward":
        return (lambda: fsq_kernels.quantize(z, levels, channel_first=cf, backend=backend)), \
            2 * _nbytes(z) + tokens * index_size
    if op == "forward+backward":
        zg = z.detach().requires_grad_(True)
        g = torch.randn_like(z)

        def fwd_bwd():
            codes, _ = fsq_kernels.quantize(zg, levels, channel_first=cf, backend=backend)
            torch.autograd.grad(codes, zg, g)

        return fwd_bwd, 2 * _nbytes(z) + tokens * index_size + 3 * _nbytes(z)
    if op == "decode":
        _, idx = fsq_kernels.quantize(z, levels, channel_first=cf, backend="reference")
        return (lambda: fsq_kernels.indices_to_codes(idx, levels, channel_first=cf, dtype=dtype, backend=backend)), \
            tokens * index_size + _nbytes(z)
    soft = reference.residual_soft_clamp(levels)
    return (lambda: fsq_kernels.residual_quantize(z, levels, 8, soft_clamp=soft, channel_first=cf, backend=backend)), \
        2 * _nbytes(z) + tokens * 8 * index_size


def _op_name(op: str) -> str:
    return {"decode": "indices_to_codes", "residual x8": "residual_quantize"}.get(op, "quantize")


def run_bench(device: str = "cpu", tokens: int | None = None, quick: bool = False, rep_ms: int | None = None,
              backends: list[str] | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Time every case on every available backend of `device` (the reference always, as the
    baseline; the others of `backends` when given)."""
    device_type = torch.device(device).type
    tokens = tokens or (1 << 24 if device_type == "cuda" else 1 << 16 if quick else 1 << 18)
    rep_ms = rep_ms or (50 if device_type == "cuda" else 300)
    timer = _timer(device_type, rep_ms)
    torch.manual_seed(0)
    rows = []
    for op, levels, dtype, cf, n in _cases(device_type, tokens, quick):
        z = _input(levels, n, dtype, cf, device)
        dst = torch.empty_like(z)
        copy_ms = timer(lambda: dst.copy_(z))
        copy_gbps = 2 * _nbytes(z) / copy_ms / 1e6
        timings = {}
        for backend in backends_on(device_type, _op_name(op)):
            if backends is not None and backend not in backends and backend != "reference":
                continue
            try:
                fn, nbytes = _workload(op, levels, dtype, cf, z, backend)
                timings[backend] = (timer(fn), nbytes, None)
            except Exception as exc:  # report the backend's error in its row, time the others
                timings[backend] = (float("nan"), 1, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        ref_ms = timings.get("reference", (float("nan"),))[0]
        for backend, (ms, nbytes, error) in timings.items():
            floor_ms = nbytes / (copy_gbps * 1e6)
            rows.append(dict(op=op, levels=list(levels), dtype=str(dtype)[6:], layout="channel-first" if cf else "channel-last",
                             tokens=z.numel() // len(levels), backend=backend, ms=ms, gbps=nbytes / ms / 1e6,
                             copy_gbps=copy_gbps, x_floor=ms / floor_ms, vs_reference=ref_ms / ms, error=error))
            if progress:
                progress(_format_row(rows[-1]))
    return rows


def _format_row(r: dict) -> str:
    return (f"{r['op']:<18}{str(r['levels']):<20}{r['dtype']:<10}{r['layout']:<15}{r['tokens']:>10}  "
            f"{r['backend']:<10}{r['ms']:>10.3f}{r['gbps']:>9.2f}{r['x_floor']:>9.2f}{r['vs_reference']:>7.1f}x"
            + (f"  ERROR {r['error']}" if r["error"] else ""))


def format_rows(rows: list[dict], device: str) -> str:
    header = (f"{'op':<18}{'levels':<20}{'dtype':<10}{'layout':<15}{'tokens':>10}  {'backend':<10}"
              f"{'ms':>10}{'GB/s':>9}{'x floor':>9}{'vs ref':>8}")
    lines = [f"bench on {device} (floor: a copy of the input on the same device, measured in this run)",
             header, "-" * len(header)]
    lines += [_format_row(r) for r in rows]
    lines.append(f"x floor: time / (bytes at copy bandwidth); vs ref: how many times faster than the reference. "
                 f"Full comparison with vector-quantize-pytorch: {FULL_REPORT}")
    return "\n".join(lines)
