"""GPU-only checks of scripts/gpu_session.sh that `python -m fsq_kernels check` does not cover,
all through the public API and judged by fsq_kernels.matching (the suite's rule):

    large    a tensor past 2^31 elements per backend, compared with the reference on slices
             (the start, across element 2^31, the end), and its decode
    guard    a cuda:1 tensor while cuda:0 is current (needs two GPUs): results on cuda:1, correct
    graph    quantize and decode captured in a CUDA graph, replayed on new data
    compile  torch.compile(fullgraph=True) of quantize, decode and the FSQ module

    python scripts/gpu_session_checks.py large guard graph compile
    python scripts/gpu_session_checks.py --list
    python scripts/gpu_session_checks.py build-jit   # fallback build of the extension (see build_jit)

Each check prints PASS/FAIL/SKIP lines; the exit code is 1 if any failed.
"""

from __future__ import annotations

import sys
import time

CHECKS = ("large", "guard", "graph", "compile")
LEVELS = (8, 5, 5, 5)


def _fused(torch, fsq_kernels, op="quantize"):
    from fsq_kernels.envinfo import backends_on

    return [b for b in backends_on("cuda", op) if b != "reference"]


def _report(name: str, ok: bool | None, detail: str = "") -> bool:
    print(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    return ok is not False


def _try(name, fn) -> bool:
    start = time.perf_counter()
    try:
        detail = fn() or ""
    except Exception as exc:  # a failed check, reported with its error; the others still run
        return _report(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return _report(name, True, f"{detail} ({time.perf_counter() - start:.1f} s)".strip())


def check_large(torch, fsq_kernels, matching) -> bool:
    ok = True
    for backend in _fused(torch, fsq_kernels):
        for dtype, channel_first in ((torch.float32, False), (torch.bfloat16, True)):
            def run(backend=backend, dtype=dtype, channel_first=channel_first):
                tokens = (2**31 + 2**21) // len(LEVELS)  # elements past 2^31
                if channel_first:
                    z = torch.randn(2, len(LEVELS), tokens // 2, device="cuda", dtype=dtype) * 2
                else:
                    z = torch.randn(tokens, len(LEVELS), device="cuda", dtype=dtype) * 2
                codes, idx = fsq_kernels.quantize(z, LEVELS, channel_first=channel_first, backend=backend)
                decoded = fsq_kernels.indices_to_codes(idx, LEVELS, channel_first=channel_first, dtype=dtype,
                                                       backend=backend)
                torch.cuda.synchronize()
                length = z.shape[-1] if channel_first else tokens  # the sliced axis
                # the token (position on the sliced axis) that holds element 2^31
                seam = (2**31 % (len(LEVELS) * length)) % length if channel_first else 2**31 // len(LEVELS)
                diffs = 0
                for start in (0, seam - 2**15, length - 2**16):
                    sl = (slice(None), slice(None), slice(start, start + 2**16)) if channel_first else slice(start, start + 2**16)
                    isl = (slice(None), slice(start, start + 2**16)) if channel_first else sl
                    diffs += matching.assert_matches_reference(codes[sl], idx[isl], z[sl], LEVELS, channel_first=channel_first)
                    matching.assert_decode_matches_reference(decoded[sl], idx[isl], LEVELS, channel_first=channel_first)
                del z, codes, idx, decoded
                torch.cuda.empty_cache()
                return f"{tokens * len(LEVELS)} elements, {diffs} in-window diffs on 3 slices"

            ok &= _try(f"large {backend} {str(dtype)[6:]} {'channel-first' if channel_first else 'channel-last'}", run)
    return ok


def check_guard(torch, fsq_kernels, matching) -> bool:
    if torch.cuda.device_count() < 2:
        return _report("guard", None, "one GPU visible: cuda:1 not present")
    ok = True
    for backend in _fused(torch, fsq_kernels):
        def run(backend=backend):
            torch.cuda.set_device(0)
            z = torch.randn(4097, len(LEVELS), device="cuda:1")
            codes, idx = fsq_kernels.quantize(z, LEVELS, backend=backend)
            decoded = fsq_kernels.indices_to_codes(idx, LEVELS, backend=backend)
            torch.cuda.synchronize(1)
            if {codes.device, idx.device, decoded.device} != {torch.device("cuda:1")}:
                raise AssertionError(f"outputs on {codes.device}, {idx.device}, {decoded.device}")
            matching.assert_matches_reference(codes, idx, z, LEVELS)
            matching.assert_decode_matches_reference(decoded, idx, LEVELS)

        ok &= _try(f"guard {backend} cuda:1 while cuda:0 is current", run)
    return ok


def check_graph(torch, fsq_kernels, matching) -> bool:
    ok = True
    for backend in _fused(torch, fsq_kernels):
        def run(backend=backend):
            static = torch.randn(8192, len(LEVELS), device="cuda")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (compilation, allocator) outside the capture
                for _ in range(2):
                    fsq_kernels.indices_to_codes(fsq_kernels.quantize(static, LEVELS, backend=backend)[1], LEVELS,
                                                 backend=backend)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                codes, idx = fsq_kernels.quantize(static, LEVELS, backend=backend)
                decoded = fsq_kernels.indices_to_codes(idx, LEVELS, backend=backend)
            for _ in range(2):
                static.copy_(torch.randn_like(static) * 2)
                graph.replay()
                torch.cuda.synchronize()
                matching.assert_matches_reference(codes, idx, static, LEVELS)
                matching.assert_decode_matches_reference(decoded, idx, LEVELS)
            return "2 replays on new data"

        ok &= _try(f"graph {backend}", run)
    return ok


def check_compile(torch, fsq_kernels, matching) -> bool:
    ok = True
    for backend in _fused(torch, fsq_kernels):
        def run(backend=backend):
            torch._dynamo.reset()

            def step(z):
                codes, idx = fsq_kernels.quantize(z, LEVELS, channel_first=True, backend=backend)
                return codes, idx, fsq_kernels.indices_to_codes(idx, LEVELS, channel_first=True, backend=backend)

            compiled = torch.compile(step, fullgraph=True)
            z = torch.randn(2, len(LEVELS), 33, 31, device="cuda") * 2
            codes, idx, decoded = compiled(z)
            matching.assert_matches_reference(codes, idx, z, LEVELS, channel_first=True)
            matching.assert_decode_matches_reference(decoded, idx, LEVELS, channel_first=True)
            module = fsq_kernels.FSQ(levels=list(LEVELS), dim=64, backend=backend).cuda()
            x = torch.randn(2, 50, 64, device="cuda", requires_grad=True)
            out_eager, idx_eager = module(x)
            out, idx2 = torch.compile(module, fullgraph=True)(x)
            out.sum().backward()
            if not torch.equal(idx2, idx_eager) or not torch.allclose(out, out_eager, rtol=1e-5, atol=1e-6):
                raise AssertionError("compiled FSQ module differs from eager")
            return "functional (channel-first) + FSQ module fwd/bwd"

        ok &= _try(f"compile {backend}", run)
    return ok


def build_jit() -> int:
    """Fallback build of fsq_kernels._C when `setup.py build_ext` cannot run here (e.g. a
    setuptools older than 77 rejects pyproject's license field): setup.py's own configuration,
    compiled by torch.utils.cpp_extension.load and copied next to the package, with its build
    record."""
    import importlib.util
    import os
    import shutil
    import sysconfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    spec = importlib.util.spec_from_file_location("fsq_setup", os.path.join(root, "setup.py"))
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines, does not run setup()
    ext = setup_py.extension()
    _, info = setup_py._configure(ext)
    from torch.utils.cpp_extension import load

    macros = [f"-D{name}={value}" for name, value in ext.define_macros]
    args = ext.extra_compile_args
    build_dir = os.path.join(root, "build", "jit")
    os.makedirs(build_dir, exist_ok=True)
    module = load(name="_C", sources=[os.path.join(root, src) for src in ext.sources],
                  extra_cflags=args["cxx"] + macros, extra_cuda_cflags=args.get("nvcc", []) + macros,
                  extra_include_paths=ext.include_dirs, extra_ldflags=ext.extra_link_args,
                  build_directory=build_dir, verbose=True)
    target = os.path.join(root, "fsq_kernels", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copyfile(module.__file__, target)
    setup_py._write_build_info(os.path.join(root, "fsq_kernels", "_build_info.py"), info)
    print(f"built {target} ({'with' if info['with_cuda'] else 'without'} CUDA, sass {info['sass']}, ptx {info['ptx']})")
    return 0


def main(argv: list[str]) -> int:
    if "--list" in argv or not argv:
        print("\n".join(CHECKS + ("build-jit",)))
        return 0
    if argv == ["build-jit"]:
        return build_jit()
    unknown = [a for a in argv if a not in CHECKS]
    if unknown:
        print(f"unknown checks {unknown}; choose from {list(CHECKS)}", file=sys.stderr)
        return 2
    import torch

    import fsq_kernels
    from fsq_kernels import matching

    if not torch.cuda.is_available():
        print("no GPU visible", file=sys.stderr)
        return 2
    print(f"backends on cuda: {_fused(torch, fsq_kernels)}", flush=True)
    ok = True
    for name in argv:
        ok &= globals()[f"check_{name}"](torch, fsq_kernels, matching)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
