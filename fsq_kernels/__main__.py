"""Does fsq-kernels work here, and which backend runs?

    python -m fsq_kernels                                   # versions, build, GPU, each backend (or why not)
    python -m fsq_kernels check [--device cpu|cuda] [--quick]   # every backend against the reference
    python -m fsq_kernels bench [--device cpu|cuda] [--quick]   # short benchmark against the copy floor
    python -m fsq_kernels ... --json                        # machine-readable output
    python -m fsq_kernels check --backend cpp               # one backend (repeatable)

`check` exits 1 on any mismatch (2 when the device is not there). Set TRITON_INTERPRET=1 to
include Triton on CPU tensors (through its interpreter, slowly).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _device(value: str) -> str:
    kind = torch.device(value).type
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda (or cuda:N); got {value!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    parser = argparse.ArgumentParser(prog="python -m fsq_kernels", description=__doc__, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", parents=[common], help="versions, build, GPU and backends (the default)")
    for name, text in (("check", "compare every available backend with the reference"),
                       ("bench", "short benchmark of the backends against the reference and the copy floor")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda[:N] (default: cuda when a GPU is visible)")
        p.add_argument("--quick", action="store_true", help="a subset that runs in seconds")
        p.add_argument("--backend", action="append", choices=("reference", "cpp", "cuda", "triton"), default=None,
                       help="only this backend (repeatable; default: every available one)")
        if name == "bench":
            p.add_argument("--tokens", type=int, default=None, help="tokens per case (default 2^24 on CUDA; 2^18 on CPU, 2^16 with --quick)")
    return parser


def _emit(args, payload, text: str) -> None:
    print(json.dumps(payload, indent=1, default=str) if getattr(args, "json", False) else text, flush=True)


def _device_missing(device: str) -> str | None:
    if torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        return f"{device} does not exist ({torch.cuda.device_count()} GPUs visible)"
    return None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "info"
    progress = lambda line: print(f"  {line}", file=sys.stderr, flush=True)  # noqa: E731  (partial results survive a timeout)
    if command == "info":
        from .envinfo import collect, format_info

        info = collect()
        _emit(args, info, format_info(info))
        return 0
    missing = _device_missing(args.device)
    if missing:
        print(f"python -m fsq_kernels {command}: {missing}", file=sys.stderr)
        return 2
    if command == "check":
        from dataclasses import asdict

        from .selfcheck import format_table, summarize, timed_check

        outcomes, seconds = timed_check(args.device, args.quick, args.backend, progress)
        failed = [o for o in outcomes if not o.ok]
        payload = {"device": args.device, "quick": args.quick, "seconds": round(seconds, 2), "ok": not failed,
                   "summary": summarize(outcomes), "failures": [asdict(o) for o in failed]}
        _emit(args, payload, format_table(outcomes, args.device, seconds))
        return 1 if failed else 0
    from .quickbench import format_rows, run_bench

    rows = run_bench(args.device, tokens=args.tokens, quick=args.quick, backends=args.backend, progress=progress)
    _emit(args, {"device": args.device, "rows": rows}, format_rows(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
