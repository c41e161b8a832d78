#!/usr/bin/env python
"""Fail if any CUDA kernel of the extension spills registers.

The extension is compiled with `-Xptxas -v` (setup.py, CMakeLists.txt), so ptxas prints, per
kernel and architecture, its registers, stack frame and spill stores/loads. This script reads
that output and exits 1 on any spill (or when no kernel is found, unless --allow-empty).

    # from a build log (pip hides it unless -v):
    pip install --no-build-isolation -v -e . 2>&1 | tee build.log
    python scripts/check_ptxas.py build.log

    # or compile csrc/fsq_cuda.cu once more, straight to cubins (no GPU needed; ~2 min/arch):
    python scripts/check_ptxas.py --compile --arch 80 --arch 90

Exit status: 0 clean, 1 spills (or nothing found), 2 usage / compile error.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def _short_name(mangled: str) -> str:
    m = re.search(r"\d+((?:fsq|dither|accumulate_usage)_\w*?kernel)I(.*?)EEv", mangled)
    if not m:
        return mangled
    arg = m.group(2)
    suffix = ", shared" if "Lb1" in arg else ""  # accumulate_usage_kernel<index_t, kShared>
    for key, name in (("BFloat16", "bfloat16"), ("Half", "half"), ("d", "double"), ("f", "float"),
                      ("l", "int64"), ("i", "int32")):
        if key in arg:
            return f"{m.group(1)}<{name}{suffix}>"
    return f"{m.group(1)}<{arg}>"


def parse(text: str) -> list[dict]:
    """One record per (kernel, arch): registers, stack, spill_stores, spill_loads."""
    records, current = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"kernel": _short_name(m.group(1)), "arch": m.group(2), "registers": None,
                       "stack": None, "spill_stores": None, "spill_loads": None}
            records.append(current)
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
    # a kernel compiled twice (setup.py and CMake in one log) appears twice: keep the last
    unique = {}
    for r in records:
        unique[(r["kernel"], r["arch"])] = r
    return list(unique.values())


def _compile(archs: list[str]) -> str:
    import torch  # noqa: F401
    from torch.utils import cpp_extension

    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        print("check_ptxas: nvcc not found (set CUDA_HOME)", file=sys.stderr)
        sys.exit(2)
    includes = [os.path.join(ROOT, "csrc"), *cpp_extension.include_paths(device_type="cuda")]
    purelib = sysconfig.get_paths()["purelib"]
    includes += sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "include")))
    includes.append(sysconfig.get_paths()["include"])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            cmd = [nvcc, "-cubin", "-std=c++20", "-O3", "-Xptxas", "-v", f"-arch=sm_{arch}",
                   "-DFSQ_WITH_CUDA=1", "--expt-relaxed-constexpr", "-D_GLIBCXX_USE_CXX11_ABI=1",
                   *[f"-I{d}" for d in includes], "-o", os.path.join(tmp, f"fsq_{arch}.cubin"),
                   os.path.join(ROOT, "csrc", "fsq_cuda.cu")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                sys.exit(2)
            out.append(proc.stdout + proc.stderr)
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="*", help="build logs with ptxas -v output ('-' for stdin)")
    parser.add_argument("--compile", action="store_true", help="compile csrc/fsq_cuda.cu to cubins and check those")
    parser.add_argument("--arch", action="append", default=None, help="SM version for --compile (default 80, 90)")
    parser.add_argument("--allow-empty", action="store_true", help="no kernel found is not an error (CPU-only build)")
    args = parser.parse_args(argv)
    if not args.logs and not args.compile:
        parser.error("give build logs or --compile")
    text = ""
    for path in args.logs:
        text += sys.stdin.read() if path == "-" else open(path, errors="replace").read()
    if args.compile:
        text += _compile(args.arch or ["80", "90"])
    records = parse(text)
    if not records:
        print("check_ptxas: no ptxas kernel report found"
              + (" (allowed)" if args.allow_empty else " (was the extension built with CUDA and -Xptxas -v?)"))
        return 0 if args.allow_empty else 1
    bad = [r for r in records if (r["spill_stores"] or 0) > 0 or (r["spill_loads"] or 0) > 0]
    print(f"{'kernel':34s} {'arch':7s} {'regs':>5s} {'stack':>6s} {'spill st':>9s} {'spill ld':>9s}")
    for r in sorted(records, key=lambda r: (r["kernel"], r["arch"])):
        flag = "  <-- SPILLS" if r in bad else ""
        print(f"{r['kernel']:34s} {r['arch']:7s} {r['registers']!s:>5s} {r['stack']!s:>6s} "
              f"{r['spill_stores']!s:>9s} {r['spill_loads']!s:>9s}{flag}")
    if bad:
        print(f"check_ptxas: {len(bad)} kernel(s) spill registers", file=sys.stderr)
        return 1
    print(f"check_ptxas: {len(records)} kernel/arch pairs, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
