"""Side-by-side kernel benchmark report: a table of medians and ratios, a CSV and a plot.

    python -m benchmarks.report [--quick | --preset headline] [--out DIR]

Providers run in one process, interleaved, and each row is the median of several repetitions.
The floor is one allocating torch.tanh over the same tensor on CPU. On CUDA the times are
triton.testing.do_bench medians, and the floor is the minimal bytes of the op at the measured
device-to-device copy bandwidth. Writes DIR/report.md, DIR/report.csv and DIR/report.png.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import metrics
from .providers import (
    FLOOR, LAYOUTS, LEVEL_SETS, MODES, VQP, Case, available_providers, build, build_floor,
    make_input, minimal_bytes,
)

CSV_COLUMNS = [
    "provider", "quantizer", "mode", "dtype", "levels", "layout", "tokens", "median_ms", "ratio_to_floor",
    "speedup_vs_vqp", "gbps", "aten_ops", "saved_bytes_per_element", "peak_mb",
]

PRESETS = {
    # name: (modes, dtypes, level sets, layouts, log2 token sizes, residual stage counts, repetitions)
    # stage count 0 is plain FSQ; > 0 is ResidualFSQ (forward and forward+backward only).
    "quick": (MODES, ("fp32",), ((8, 5, 5, 5),), ("channel-last",), (12, 16), (0,), 5),
    "headline": (("forward", "forward+backward"), ("fp32",), ((8, 5, 5, 5),), ("channel-last",), (22,), (0,), 7),
    "residual": (("forward", "forward+backward"), ("fp32",), ((8, 5, 5, 5),), ("channel-last",), (14, 20), (4, 8), 5),
    "full": (MODES, ("fp32", "bf16"), LEVEL_SETS, LAYOUTS, (10, 14, 18, 22), (0, 4, 8), 7),
    "module": ((), (), (), (), (), (), 7),
    "usage": ((), (), (), (), (), (), 7),  # the fused usage histogram's row: benchmarks/usage.py
}
# The module row: FSQ([8,5,5,5], dim=256) with its projections, forward+backward at 2^16 tokens,
# eager and torch.compile'd, ours against vector-quantize-pytorch; in these presets:
MODULE_PRESETS = ("headline", "full", "module")
MODULE_CASE = dict(mode="forward+backward", dtype="fp32", levels=(8, 5, 5, 5), layout="channel-last", tokens=2**16, dim=256)
RESIDUAL_MODES = ("forward", "forward+backward")


@dataclass
class Row:
    provider: str
    case: Case
    times_ms: list[float] = field(default_factory=list)
    aten_ops: int | None = None
    peak_mb: float | None = None
    saved_bytes_per_element: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_cpu(fns: dict[str, object], reps: int) -> dict[str, list[float]]:
    """Interleaved wall-clock times: every repetition runs each provider once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (lazy init, compilation)
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            times[name].append((time.perf_counter() - start) * 1e3)
            del result
    return times


def _time_cuda(fns: dict[str, object], reps: int) -> dict[str, list[float]]:
    import triton.testing

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    return times


def _copy_bandwidth_gbps(device: str) -> float:
    import triton.testing

    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def run_case(case: Case, providers, reps: int) -> list[Row]:
    functions = {p.name: p.functions() for p in providers}
    compiled = {p.name for p in providers if p.compiled}
    fns = {name: build(funcs, case) for name, funcs in functions.items()}
    if case.device == "cpu":
        fns[FLOOR] = build_floor(case)
        times = _time_cpu(fns, reps)
    else:
        times = _time_cuda(fns, reps)
    rows = []
    for name, fn in fns.items():
        row = Row(name, case, times[name])
        ops, row.peak_mb = metrics.dispatch_profile(fn)
        # Compiled graphs run generated kernels outside the dispatcher: their count means nothing.
        row.aten_ops = None if name in compiled else ops
        if name != FLOOR and case.mode in ("backward", "forward+backward"):
            forward_case = Case("forward", case.dtype, case.levels, case.layout, case.tokens, case.device, case.stages,
                                case.dim)
            z_numel = case.tokens * (case.dim or len(case.levels))
            quantize = functions[name][0]
            z = make_input(forward_case).requires_grad_(True)
            row.saved_bytes_per_element = metrics.saved_bytes_per_element(lambda: quantize(z, forward_case), z_numel)
        rows.append(row)
    return rows


def to_records(rows: list[Row], device: str, bandwidth_gbps: float | None) -> list[dict]:
    by_case: dict[Case, dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault(row.case, {})[row.provider] = row
    records = []
    for case, group in by_case.items():
        if device == "cuda":
            floor_ms = minimal_bytes(case) / (bandwidth_gbps * 1e9) * 1e3
        else:
            floor_ms = group[FLOOR].median_ms
        vqp_ms = group[VQP].median_ms if VQP in group else None
        for name, row in group.items():
            ms = row.median_ms
            records.append({
                "provider": name if name != FLOOR else "floor (torch.tanh)",
                "quantizer": case.quantizer,
                "mode": case.mode,
                "dtype": case.dtype,
                "levels": "[" + ",".join(map(str, case.levels)) + "]",
                "layout": case.layout,
                "tokens": case.tokens,
                "median_ms": round(ms, 4),
                "ratio_to_floor": round(ms / floor_ms, 3),
                "speedup_vs_vqp": round(vqp_ms / ms, 2) if vqp_ms else "",
                "gbps": round(minimal_bytes(case) / (ms * 1e-3) / 1e9, 2),
                "aten_ops": row.aten_ops if row.aten_ops is not None else "",
                "saved_bytes_per_element": round(row.saved_bytes_per_element, 2) if row.saved_bytes_per_element is not None else "",
                "peak_mb": round(row.peak_mb, 2) if row.peak_mb is not None else "",
            })
    return records


def environment_lines(device: str, reps: int) -> list[str]:
    import triton

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()} ({cpu}, {os.cpu_count()} cores), GPU: {gpu}",
        f"- torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
        f"- threads: {torch.get_num_threads()}; medians of {reps} interleaved repetitions",
    ]


def write_markdown(path: Path, records: list[dict], device: str, reps: int) -> None:
    floor_note = (
        "one allocating `torch.tanh` over the same tensor, timed in the same run"
        if device == "cpu" else "the op's minimal bytes at the measured device-to-device copy bandwidth"
    )
    lines = ["# fsq-kernels benchmark report", "", *environment_lines(device, reps), f"- floor: {floor_note}", ""]
    lines += [
        "`x floor`: median time over the floor's (lower is better; 1.0 means as fast as the floor).",
        "`vs vqp`: vector-quantize-pytorch's median over this provider's (higher is better).",
        "`ops`: ATen ops dispatched by one call (a kernel launch each on a GPU). `saved B/el`: bytes kept for",
        "backward per input element. `peak MB`: live bytes of the tensors one call allocates.",
        "",
        "| provider | quantizer | mode | dtype | levels | layout | tokens | median ms | x floor | vs vqp | GB/s | ops | saved B/el | peak MB |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        tokens = f"2^{int(math.log2(r['tokens']))}"
        lines.append(
            f"| {r['provider']} | {r['quantizer']} | {r['mode']} | {r['dtype']} | {r['levels']} | {r['layout']} | {tokens} | "
            f"{r['median_ms']:.3f} | {r['ratio_to_floor']:.2f} | {r['speedup_vs_vqp']} | {r['gbps']} | "
            f"{r['aten_ops']} | {r['saved_bytes_per_element']} | {r['peak_mb']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, records: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(records)


def write_plot(path: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One panel per mode, for the first dtype/levels/layout in the run.
    first = records[0]
    key = ("quantizer", "dtype", "levels", "layout")
    chosen = [r for r in records if all(r[k] == first[k] for k in key)]
    modes = [m for m in MODES if any(r["mode"] == m for r in chosen)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        providers = sorted({r["provider"] for r in chosen if r["mode"] == mode})
        for provider in providers:
            pts = sorted((r["tokens"], r["median_ms"]) for r in chosen if r["mode"] == mode and r["provider"] == provider)
            style = "--" if provider.startswith("floor") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(mode)
        ax.set_xlabel("tokens")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median time (ms)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{first['quantizer']} {first['levels']} {first['dtype']} {first['layout']}: time vs tokens (log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 'quick' preset: under 3 minutes on a 2-core CPU")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="case matrix (default: full)")
    parser.add_argument("--out", default="bench-report", help="output folder (default: bench-report)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case (median taken)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile(vector-quantize-pytorch)")
    args = parser.parse_args(argv)

    preset = "quick" if args.quick else (args.preset or "full")
    if preset == "usage":
        from .usage import main as usage_main

        usage_main(["--out", args.out] + (["--reps", str(args.reps)] if args.reps else []))
        return
    modes, dtypes, level_sets, layouts, log2_sizes, stage_counts, reps = PRESETS[preset]
    reps = args.reps or reps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [
        Case(mode, dtype, levels, layout, 2**k, device, stages)
        for stages in stage_counts for levels in level_sets for dtype in dtypes for layout in layouts
        for k in log2_sizes for mode in modes
        if not stages or (mode in RESIDUAL_MODES and layout == "channel-last" and dtype == "fp32" and levels == (8, 5, 5, 5))
    ]
    if preset in MODULE_PRESETS:
        cases.append(Case(device=device, **MODULE_CASE))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = {p.name for op in {c.op for c in cases} for p in available_providers(device, not args.no_compile, op)}
    print(f"{preset}: {len(cases)} cases, providers {sorted(names)} on {device}")
    rows: list[Row] = []
    for case in tqdm(cases, desc="benchmark", unit="case"):
        rows.extend(run_case(case, available_providers(device, not args.no_compile, case.op), reps))
    records = to_records(rows, device, _copy_bandwidth_gbps(device) if device == "cuda" else None)
    write_markdown(out / "report.md", records, device, reps)
    write_csv(out / "report.csv", records)
    write_plot(out / "report.png", records)
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}")


if __name__ == "__main__":
    main()
