"""One source of constants: fsq_kernels/ops/tables.py builds every table from the reference, and
every backend consumes exactly those numbers (docs/design.md, "Tables").

* the table is the reference's comparison boundaries and channel constants;
* the C++ parser (what the CPU and CUDA kernels read: fsq::parsed_table) returns the table's
  numbers unchanged, and Triton's constexpr payload holds the same numbers;
* the kernels really use them: an edited table changes their output as predicted;
* no kernel source derives a constant itself;
* the tables reach torch.compile(fullgraph=True) and torch.export as constants.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import struct

import pytest
import torch

from fsq_kernels import reference
from fsq_kernels.ops import native, tables

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEVEL_SETS = [(8, 5, 5, 5), (8, 6, 5), (2, 3, 4), (7, 5, 5, 5, 5), (300, 7), (1500, 3)]
VARIANT_CLAMPS = [("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True)]
MATH_DTYPES = (torch.float32, torch.float64)
needs_cpp = pytest.mark.skipif(not native.is_available("cpu"), reason="extension not built")


def _f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


@pytest.mark.parametrize("dtype", MATH_DTYPES, ids=str)
@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_table_is_built_from_the_reference(levels, variant, hard_clamp, dtype):
    if hard_clamp and 1500 in levels:
        pytest.skip("hard_clamp has no unreachable boundaries to test here")
    table = tables.quantize_table(levels, variant, hard_clamp, dtype)
    fields, rows, extra = tables.split(table, len(levels))
    k0, want_rows = reference.comparison_boundaries(levels, variant, hard_clamp, dtype)
    consts = reference.channel_constants(levels, variant, hard_clamp)
    assert rows == want_rows and fields["k0"] == k0 and extra == []
    assert fields["nb"] == [len(r) for r in want_rows]
    rnd = _f32 if dtype == torch.float32 else float
    for i, level in enumerate(levels):
        hw = level // 2
        if variant == "symmetric":
            assert (fields["shift"][i], fields["grad_coef"][i]) == (0.0, 1.0)
            assert (fields["code_mul"][i], fields["code_sub"][i], fields["code_den"][i]) == (2, level - 1, level - 1)
        else:
            assert fields["shift"][i] == rnd(consts["shift"][i])
            assert fields["grad_coef"][i] == rnd(consts["half_l"][i] / hw)
            assert (fields["code_mul"][i], fields["code_sub"][i], fields["code_den"][i]) == (1, hw, hw)
    if dtype == torch.float32:  # every number is a float32 value
        assert all(math.isnan(v) or _f32(v) == v for v in table)
    if variant == "paper" and 1500 in levels:
        assert fields["k0"][0] > 0 and fields["nb"][0] + fields["k0"][0] < 1499  # unreachable ends


def test_residual_table_is_symmetric_table_plus_scales():
    levels, q = (8, 5, 5, 5), 6
    table = tables.residual_table(levels, q, True, torch.bfloat16)
    head = tables.quantize_table(levels, "symmetric", True, torch.float32)
    assert table[:len(head)] == head
    assert table[len(head):] == [v for row in reference.residual_scales(levels, q) for v in row]


@needs_cpp
@pytest.mark.parametrize("dtype", MATH_DTYPES, ids=str)
@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4), (300, 7)], ids=str)
def test_cpp_reads_the_table_numbers(levels, variant, hard_clamp, dtype):
    """fsq::parsed_table: what the CPU and CUDA kernels read (the CUDA launcher fills its
    arguments from the same parse, as float32)."""
    for num_stages in ((0, 3) if variant == "symmetric" else (0,)):
        table = (tables.residual_table(levels, num_stages, hard_clamp, dtype) if num_stages
                 else tables.quantize_table(levels, variant, hard_clamp, dtype))
        got = torch.ops.fsq.parsed_table(list(levels), variant, hard_clamp, num_stages, table, dtype).tolist()
        fields, rows, extra = tables.split(table, len(levels))
        names = ("k0", "nb", "shift", "grad_coef", "code_mul", "code_sub", "code_den", "input_scale")
        want = [fields[n][i] for i in range(len(levels)) for n in names]
        want += [t for row in rows for t in row] + extra
        assert got == want


@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
def test_triton_constexprs_are_the_table_numbers(variant, hard_clamp):
    ops_triton = pytest.importorskip("fsq_kernels.ops.triton")
    pytest.importorskip("triton")
    for levels in [(8, 5, 5, 5), (2, 3, 4), (300, 7)]:
        table = tables.quantize_table(levels, variant, hard_clamp, torch.bfloat16)
        fields, rows, _ = tables.split(table, len(levels))
        cst = ops_triton.payload(levels, variant, hard_clamp, tuple(table))
        assert cst["BOUNDS"] == (tuple(tuple(r) for r in rows) if max(levels) <= 32 else ())
        for key, name in (("SHIFT", "shift"), ("GRAD_SCALE", "grad_coef"), ("HALF_L", "half_l"), ("OFFSET", "offset")):
            assert list(cst[key]) == fields[name]
    if variant == "symmetric":
        table = tables.residual_table((8, 5, 5, 5), 4, hard_clamp, torch.float32)
        cst = ops_triton.payload((8, 5, 5, 5), "symmetric", hard_clamp, tuple(table), (1.5, 1.25, 1.25, 1.25), 4)
        assert [list(r) for r in cst["SCALES"]] == reference.residual_scales((8, 5, 5, 5), 4)


def _edited(table, d, channel, boundary, value):
    """The table with one boundary of one channel replaced."""
    fields, _, _ = tables.split(table, d)
    at = d * tables.NUM_FIELDS + int(sum(fields["nb"][:channel])) + boundary
    out = list(table)
    out[at] = value
    return out


def _backend_ops():
    out = []
    if native.is_available("cpu"):
        out.append(torch.ops.fsq)
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import fsq_kernels.ops.triton as ops_triton

            if ops_triton.is_available("cpu"):
                out.append(torch.ops.fsq_triton)
        except ImportError:
            pass
    return out


@pytest.mark.parametrize("ns", _backend_ops(), ids=lambda ns: ns._dir and ns.name if hasattr(ns, "name") else str(ns))
def test_kernels_use_the_table_they_are_given(ns):
    """Moving a boundary, a gradient coefficient or a stage scale in the table moves the kernel's
    answer accordingly: the kernels take their numbers from the table, nowhere else."""
    levels, variant = (8, 5, 5, 5), "atanh"
    table = tables.quantize_table(levels, variant, False, torch.float32)
    fields, rows, _ = tables.split(table, 4)
    z = torch.tensor([[rows[0][3] + 0.01, 0.0, 0.0, 0.0]])
    _, idx = ns.quantize(z, list(levels), variant, False, False, 1, True, table)
    _, idx2 = ns.quantize(z, list(levels), variant, False, False, 1, True, _edited(table, 4, 0, 3, rows[0][3] + 0.02))
    assert int(idx) - int(idx2) == 1  # z no longer above boundary 3 of channel 0
    coef = list(table)
    coef[3] = 2 * table[3]  # grad_coef of channel 0
    g = torch.ones_like(z)
    gz = ns.quantize_backward(g, z, list(levels), variant, False, False, 1, table)
    gz2 = ns.quantize_backward(g, z, list(levels), variant, False, False, 1, coef)
    assert gz2[0, 0] == 2 * gz[0, 0] and torch.equal(gz2[0, 1:], gz[0, 1:])
    rtable = tables.residual_table(levels, 2, True, torch.float32)
    x = torch.full((1, 4), 0.3)
    out, _ = ns.residual_quantize(x, list(levels), 2, True, None, False, None, rtable)
    scaled = rtable[:-4] + [2.0 * v for v in rtable[-4:]]  # stage 1's scales doubled
    out2, _ = ns.residual_quantize(x, list(levels), 2, True, None, False, torch.tensor(1), scaled)
    out1, _ = ns.residual_quantize(x, list(levels), 2, True, None, False, torch.tensor(1), rtable)
    assert torch.equal(out1, out2)  # stage 1 dropped: its scales do not matter
    out3, _ = ns.residual_quantize(x, list(levels), 2, True, None, False, None, scaled)
    assert not torch.equal(out, out3)


def test_no_kernel_source_derives_a_constant():
    """The level constants are derived once, in Python: no atanh/tan/eps in the kernel sources and
    no call into the reference's constant builders from the Triton kernels."""
    for path in list((ROOT / "csrc").glob("*.h")) + list((ROOT / "csrc").glob("*.c*")) + list((ROOT / "csrc").glob("*.inc")):
        text = path.read_text()
        assert not re.search(r"\b(atanh|tan|atanhf|tanf)\s*\(|kEps|1e-3|std::pow", text), path.name
    for path in (ROOT / "fsq_kernels" / "triton").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"import reference|math\.(atanh|tan)\b|\bEPS\b|_f32_round", text), path.name


@needs_cpp
def test_tables_are_constants_under_compile_and_export():
    """A cache miss inside torch.compile(fullgraph=True) or torch.export builds the table eagerly
    (assume_constant_result) and bakes it into the graph; nothing is traced through its Python."""
    levels = (7, 6, 3)  # a level set no other test has built yet

    def f(z):
        return native.quantize(z, levels, "atanh", True, False, 1, True)

    z = torch.randn(33, 3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for want, got in zip(f(z), compiled(z)):
        assert torch.equal(want, got)

    class M(torch.nn.Module):
        def forward(self, z):
            return native.quantize(z, (5, 9), "symmetric", False, False, 1, True)

    z2 = torch.randn(10, 2)
    ep = torch.export.export(M(), (z2,))
    assert any(isinstance(a, list) and len(a) > 2 * tables.NUM_FIELDS for n in ep.graph.nodes for a in n.args)
    for want, got in zip(M()(z2), ep.module()(z2)):
        assert torch.equal(want, got)
