"""Static checks of the Triton kernels, no GPU needed: compile to PTX/cubin for sm_80 and sm_90
and read the machine code.

Every kernel (forward, backward, decode) is compiled through its real launcher: the launcher
runs with a capturing `wrap` (no kernel runs, tensors live on the meta device), and the captured
arguments become a `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` call with
pointer arguments (and integer arguments divisible by 16) specialised as 16-byte aligned
(`tt.divisibility` 16), as the JIT does for aligned tensors at run time. Checked:
- vector global loads/stores (ld.global.v4 / .v2) for [8,5,5,5] channel-last fp32 / bf16;
- the forward issues one global load per input element (bytes loaded by all threads of a program
  == tile elements x element size, nothing loaded twice); the backward loads z and grad once;
- ptxas -v (the ptxas that Triton ships) reports 0 spill bytes.
The fused residual kernels (fsq_kernels/triton/residual.py, [8,5,5,5] x 8 stages, peer soft
clamp, hard-clamped stages) get the same treatment, plus: each stage product code * scale is its
own rounded instruction (fma with a +0 addend, never contracted into the residual update), and
active_stages is a 0-d tensor the kernel loads (one scalar load; quantize dropout never recompiles).

The compilation needs the real (not interpreted) `triton.jit`, and tests/conftest.py sets
TRITON_INTERPRET=1 for the CPU suite, so the compile job runs in a subprocess without it: run
this file as a script (`python tests/test_triton_static.py`) to print the JSON report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

LEVELS = (8, 5, 5, 5)
TARGETS = (80, 90)
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("channel_last", "channel_first")
KERNELS = ("forward", "backward", "decode")
THREADS = 4 * 32  # num_warps=4 in every launcher


# --------------------------------------------------------------------------------------------
# The compile job (runs in a subprocess without TRITON_INTERPRET)
# --------------------------------------------------------------------------------------------


def _capture_launch(launcher, *args, **kwargs):
    calls = []

    def wrap(kernel):
        class _Grid:
            def __getitem__(self, grid):
                def launch(*a, **kw):
                    calls.append((kernel, grid, a, kw))

                return launch

        return _Grid()

    launcher(*args, wrap=wrap, **kwargs)
    assert len(calls) == 1, f"expected one launch, got {len(calls)}"
    return calls[0]


def _ptr_type(t) -> str:
    import torch

    return "*" + {
        torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
        torch.int32: "i32", torch.int64: "i64",
    }[t.dtype]


def _compile_captured(kernel, args, kwargs, cc):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        if value is None:  # an unused pointer (the dither's key, the usage table): a constexpr None
            signature[name] = "constexpr"
            constexprs[name] = None
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, torch.Tensor):
            signature[name] = _ptr_type(value)
            attrs[(i,)] = [["tt.divisibility", 16]]  # 16-byte-aligned allocations
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"unexpected argument {name}={value!r}")
    for name, value in kwargs.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


_LD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.(b|u|s|f)(8|16|32|64)\b")
_ST = re.compile(r"\bst\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.(b|u|s|f)(8|16|32|64)\b")


def _accesses(ptx: str, pattern):
    """[(vector width, bytes)] of each global access instruction in the PTX."""
    out = []
    for m in pattern.finditer(ptx):
        width = int(m.group(1) or 1)
        out.append((width, width * int(m.group(3)) // 8))
    return out


def _ptxas_report(ptx: str, cc: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = proc.stdout + proc.stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {
        "ptxas": ptxas,
        "spill_store_bytes": int(spill.group(1)),
        "spill_load_bytes": int(spill.group(2)),
        "registers": int(regs.group(1)) if regs else None,
    }


def _case(kernel_name: str, dtype_name: str, layout: str, cc: int, levels=LEVELS, tokens=8192) -> dict:
    import torch

    from fsq_kernels.ops import tables
    from fsq_kernels.ops.triton import payload
    from fsq_kernels.triton import fsq

    dtype = getattr(torch, dtype_name)
    d = len(levels)
    channel_first = layout == "channel_first"
    shape = (2, d, 64, 64) if channel_first else (tokens, d)
    z = torch.empty(shape, dtype=dtype, device="meta")
    cst = payload(tuple(levels), "paper", False, tuple(tables.quantize_table(levels, "paper", False, dtype)))
    if kernel_name == "forward":
        kernel, grid, args, kwargs = _capture_launch(fsq.fsq_forward, z, cst, fsq.PAPER, False, channel_first, 1, True)
    elif kernel_name == "backward":
        kernel, grid, args, kwargs = _capture_launch(
            fsq.fsq_backward, torch.empty_like(z), z, cst, fsq.PAPER, False, channel_first, 1
        )
    else:
        idx_shape = (2, 64, 64) if channel_first else (8192,)
        idx = torch.empty(idx_shape, dtype=torch.int32, device="meta")
        kernel, grid, args, kwargs = _capture_launch(fsq.fsq_decode, idx, cst, fsq.PAPER, channel_first, 1, dtype)
    block, d_pad = kwargs["BLOCK"], kwargs["D_PAD"]
    start = time.perf_counter()
    compiled = _compile_captured(kernel, args, dict(kwargs), cc)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    loads, stores = _accesses(ptx, _LD), _accesses(ptx, _ST)
    esize = torch.empty((), dtype=dtype).element_size()
    if kernel_name == "forward":
        expected_load = block * d * esize
    elif kernel_name == "backward":
        expected_load = 2 * block * d * esize
    else:
        expected_load = block * 4
    return {
        "kernel": kernel_name, "dtype": dtype_name, "layout": layout, "cc": cc, "levels": list(levels),
        "tokens": tokens if not channel_first else 2 * 64 * 64,
        "block": block, "d_pad": d_pad, "compile_s": round(seconds, 2),
        "ld_count": len(loads), "ld_widths": sorted({w for w, _ in loads}),
        "ld_bytes_per_program": sum(b for _, b in loads) * THREADS,
        "expected_ld_bytes_per_program": expected_load,
        "st_count": len(stores), "st_widths": sorted({w for w, _ in stores}),
        **_ptxas_report(ptx, cc),
    }


RESIDUAL_STAGES = 8
RESIDUAL_CASES = (
    ("residual_forward", "float32", "channel_last"),
    ("residual_backward", "float32", "channel_last"),
    ("residual_forward", "bfloat16", "channel_first"),
)
_FMA_PRODUCT = re.compile(r"\bfma\.rn\.f32\s+%r\d+,\s*%r\d+,\s*(?:%r\d+|0f[0-9A-F]{8}),\s*0f00000000;")


def _residual_case(kernel_name: str, dtype_name: str, layout: str, cc: int, levels=LEVELS,
                   stages=RESIDUAL_STAGES) -> dict:
    import torch

    from fsq_kernels import reference
    from fsq_kernels.ops import tables
    from fsq_kernels.ops.triton import payload
    from fsq_kernels.triton import residual

    dtype = getattr(torch, dtype_name)
    d = len(levels)
    channel_first = layout == "channel_first"
    x = torch.empty((2, d, 64, 64) if channel_first else (8192, d), dtype=dtype, device="meta")
    soft = tuple(reference.residual_soft_clamp(levels))
    table = tuple(tables.residual_table(levels, stages, True, dtype))
    cst = payload(tuple(levels), "symmetric", True, table, soft, stages)
    active = torch.empty((), dtype=torch.int64, device="meta")  # quantize dropout's 0-d tensor
    if kernel_name == "residual_forward":
        kernel, grid, args, kwargs = _capture_launch(residual.residual_forward, x, cst, True, channel_first, active)
        expected_load_elems = 1
        products = stages - 1
    else:
        kernel, grid, args, kwargs = _capture_launch(
            residual.residual_backward, torch.empty_like(x), x, cst, True, channel_first, active)
        expected_load_elems = 2
        products = stages - 2  # the last stage's residual update is dead in the backward
    block = kwargs["BLOCK"]
    start = time.perf_counter()
    compiled = _compile_captured(kernel, args, dict(kwargs), cc)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    loads, stores = _accesses(ptx, _LD), _accesses(ptx, _ST)
    # the one scalar 8-byte load of active_stages (quantize dropout), apart from the data loads
    active_loads = loads.count((1, 8))
    if active_loads:
        loads.remove((1, 8))
    esize = torch.empty((), dtype=dtype).element_size()
    return {
        "kernel": kernel_name, "dtype": dtype_name, "layout": layout, "cc": cc, "levels": list(levels),
        "active_stages_loads": active_loads,
        "stages": stages, "tokens": 8192, "block": block, "d_pad": kwargs["D_PAD"],
        "compile_s": round(seconds, 2),
        "ld_count": len(loads), "ld_widths": sorted({w for w, _ in loads}),
        "ld_bytes_per_program": sum(b for _, b in loads) * THREADS,
        "expected_ld_bytes_per_program": expected_load_elems * block * d * esize,
        "st_count": len(stores), "st_widths": sorted({w for w, _ in stores}),
        # stage 0 has scale 1 (the product folds away): later stages keep one rounded product
        # per element each
        "stage_products": len(_FMA_PRODUCT.findall(ptx)),
        "expected_stage_products": products * block * d // THREADS,
        "active_stages_is_loaded": kwargs.get("HAS_ACTIVE") is True and "active_ptr" in kernel.arg_names,
        **_ptxas_report(ptx, cc),
    }


def compile_report() -> list[dict]:
    cases = []
    for cc in TARGETS:
        for kernel_name in KERNELS:
            for dtype_name in DTYPES:
                for layout in LAYOUTS:
                    cases.append(_case(kernel_name, dtype_name, layout, cc))
        # the tanh path of the forward (level counts above fsq.CMP_MAX_LEVELS)
        cases.append(_case("forward", "float32", "channel_last", cc, levels=(300, 7)))
        # a token count that is not a multiple of 16: the row mask is still constant per row
        cases.append(_case("forward", "float32", "channel_last", cc, tokens=8191))
        for kernel_name, dtype_name, layout in RESIDUAL_CASES:
            cases.append(_residual_case(kernel_name, dtype_name, layout, cc))
    return cases


# --------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------

if __name__ != "__main__":
    import pytest

    try:
        import triton.backends.nvidia  # noqa: F401

        _HAVE_TRITON = True
    except ImportError:  # pragma: no cover
        _HAVE_TRITON = False

    pytestmark = pytest.mark.skipif(not _HAVE_TRITON, reason="triton with its NVIDIA backend is not installed")

    @pytest.fixture(scope="module")
    def report():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--json"], env=env, cwd=root,
            capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def _find(report, **key):
        hits = [c for c in report if all(c[k] == v for k, v in key.items())
                and c["levels"] == list(LEVELS) and c["tokens"] in (8192, 2 * 64 * 64)]
        assert len(hits) == 1, key
        return hits[0]

    def _find_residual(report, **key):
        hits = [c for c in report if c["kernel"].startswith("residual_")
                and all(c[k] == v for k, v in key.items())]
        assert len(hits) == 1, key
        return hits[0]

    @pytest.mark.parametrize("cc", TARGETS)
    @pytest.mark.parametrize("kernel,dtype,layout", RESIDUAL_CASES)
    def test_residual_compiles_without_spills(report, cc, kernel, dtype, layout):
        case = _find_residual(report, cc=cc, kernel=kernel, dtype=dtype, layout=layout)
        assert case["spill_store_bytes"] == 0 and case["spill_load_bytes"] == 0, case
        # x (and grad_out) read once: one load per input element, nothing loaded twice
        assert case["ld_bytes_per_program"] == case["expected_ld_bytes_per_program"], case
        assert case["stage_products"] == case["expected_stage_products"], case
        assert case["active_stages_is_loaded"] and case["active_stages_loads"] == 1, case

    @pytest.mark.parametrize("cc", TARGETS)
    @pytest.mark.parametrize("kernel", ["residual_forward", "residual_backward"])
    def test_residual_channel_last_vector_access(report, cc, kernel):
        # 16-byte fp32 rows: v4 loads; the forward's 8 int32 indices per row: v4 stores too
        case = _find_residual(report, cc=cc, kernel=kernel, dtype="float32", layout="channel_last")
        assert case["ld_widths"] == [4] and case["st_widths"] == [4], case

    @pytest.mark.parametrize("cc", TARGETS)
    @pytest.mark.parametrize("kernel", KERNELS)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_compiles_without_spills(report, cc, kernel, dtype, layout):
        case = _find(report, cc=cc, kernel=kernel, dtype=dtype, layout=layout)
        assert case["spill_store_bytes"] == 0 and case["spill_load_bytes"] == 0, case

    @pytest.mark.parametrize("cc", TARGETS)
    def test_tanh_path_compiles_without_spills(report, cc):
        (case,) = [c for c in report if c["cc"] == cc and c["levels"] == [300, 7]]
        assert case["spill_store_bytes"] == 0 and case["spill_load_bytes"] == 0, case

    @pytest.mark.parametrize("cc", TARGETS)
    @pytest.mark.parametrize("dtype,width", [("float32", 4), ("bfloat16", 2)])
    @pytest.mark.parametrize("kernel", ["forward", "backward"])
    def test_channel_last_vector_access(report, cc, dtype, width, kernel):
        # [8,5,5,5] rows are 16 bytes (fp32) / 8 bytes (bf16): one v4.b32 / v2.b32 per row
        case = _find(report, cc=cc, kernel=kernel, dtype=dtype, layout="channel_last")
        assert case["ld_widths"] == [width], case
        assert width in case["st_widths"], case

    @pytest.mark.parametrize("cc", TARGETS)
    def test_channel_last_vector_access_any_token_count(report, cc):
        (case,) = [c for c in report if c["cc"] == cc and c["tokens"] == 8191]
        assert case["ld_widths"] == [4] and case["ld_bytes_per_program"] == case["expected_ld_bytes_per_program"]

    @pytest.mark.parametrize("cc", TARGETS)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("kernel", ["forward", "backward"])
    def test_channel_first_vector_access(report, cc, dtype, kernel):
        # tokens are contiguous: vectors run along the spatial axis
        case = _find(report, cc=cc, kernel=kernel, dtype=dtype, layout="channel_first")
        assert max(case["ld_widths"]) >= 2 and max(case["st_widths"]) >= 2, case

    @pytest.mark.parametrize("cc", TARGETS)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("kernel", ["forward", "backward", "decode"])
    def test_one_load_per_element(report, cc, dtype, layout, kernel):
        case = _find(report, cc=cc, kernel=kernel, dtype=dtype, layout=layout)
        assert case["ld_bytes_per_program"] == case["expected_ld_bytes_per_program"], case


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = compile_report()
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        for c in result:
            print(json.dumps(c))
