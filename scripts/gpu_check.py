"""GPU entry point of the Triton backend: correctness suite on CUDA tensors + a short benchmark.

    python scripts/gpu_check.py                 # tests, then benchmark
    python scripts/gpu_check.py --bench-only    # benchmark only
    python scripts/gpu_check.py --tests-only    # FSQ_TEST_DEVICE=cuda pytest tests/test_triton.py

The tests are the CPU/interpreter suite (tests/test_triton.py) run with FSQ_TEST_DEVICE=cuda, so
the kernels are compiled for the GPU and checked against the same float64 reference; on CUDA
it also runs opcheck's AOT-dispatch test and torch.compile(fullgraph=True).

The benchmark times forward (codes + indices), backward and decode with
triton.testing.do_bench (median) next to a device-to-device copy of the same tensor and
reports GB/s (bytes read + written / time) and the ratio to the copy bandwidth measured in the
same run (DESIGN.md section 4: ratios side by side, not absolute times). It also times the
pure-PyTorch reference on the same input as the eager peer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tests(extra: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FSQ_TEST_DEVICE"] = "cuda"
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton.py", "-q", *extra]
    print("+ FSQ_TEST_DEVICE=cuda", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def bench(tokens: int, reps: int) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    import torch
    from triton.testing import do_bench

    from fsq_kernels import reference
    from fsq_kernels.triton import fsq as K

    assert torch.cuda.is_available(), "no GPU visible"
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, tokens: {tokens}")
    header = f"{'op':<10}{'levels':<20}{'dtype':<10}{'layout':<8}{'ms':>9}{'GB/s':>9}{'copy GB/s':>11}{'ratio':>7}{'ref ms':>9}"
    print(header)
    print("-" * len(header))

    def gbps(nbytes, ms):
        return nbytes / ms / 1e6

    for levels in [(8, 5, 5, 5), (8, 8, 8, 5, 5, 5)]:
        d = len(levels)
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("cl", "cf"):
                cf = layout == "cf"
                if cf:
                    side = int((tokens // 16) ** 0.5)
                    z = torch.randn(16, d, side, side, device=dev, dtype=dtype)
                else:
                    z = torch.randn(tokens, d, device=dev, dtype=dtype)
                n_tok = z.numel() // d
                g = torch.randn_like(z)
                es = z.element_size()
                idt = reference.index_dtype(levels)
                isz = torch.empty((), dtype=idt).element_size()

                # copy baseline: same tensor, device to device
                dst = torch.empty_like(z)
                t_copy = do_bench(lambda: dst.copy_(z), rep=reps)
                copy_bw = gbps(2 * z.numel() * es, t_copy)

                codes, idx = K.fsq_forward(z, levels, "paper", False, cf, 1, True)
                t_fwd = do_bench(lambda: K.fsq_forward(z, levels, "paper", False, cf, 1, True), rep=reps)
                t_ref = do_bench(
                    lambda: reference.quantize(z, levels, channel_first=cf), rep=reps
                )
                fwd_bytes = 2 * z.numel() * es + n_tok * isz
                t_bwd = do_bench(lambda: K.fsq_backward(z, g, levels, "paper", False, cf, 1), rep=reps)
                bwd_bytes = 3 * z.numel() * es
                t_dec = do_bench(lambda: K.fsq_decode(idx, levels, "paper", cf, 1, dtype), rep=reps)
                dec_bytes = n_tok * isz + z.numel() * es
                for name, t, nbytes, tref in (
                    ("forward", t_fwd, fwd_bytes, t_ref),
                    ("backward", t_bwd, bwd_bytes, float("nan")),
                    ("decode", t_dec, dec_bytes, float("nan")),
                ):
                    bw = gbps(nbytes, t)
                    print(f"{name:<10}{str(list(levels)):<20}{str(dtype)[6:]:<10}{layout:<8}{t:9.4f}{bw:9.1f}"
                          f"{copy_bw:11.1f}{bw / copy_bw:7.2f}{tref:9.4f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests-only", action="store_true")
    p.add_argument("--bench-only", action="store_true")
    p.add_argument("--tokens", type=int, default=1 << 24)
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case (ms)")
    args, extra = p.parse_known_args()
    rc = 0
    if not args.bench_only:
        rc = run_tests(extra)
    if not args.tests_only:
        bench(args.tokens, args.rep_ms)
    return rc


if __name__ == "__main__":
    sys.exit(main())
