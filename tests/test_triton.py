"""Correctness of the Triton backend against the float64 reference (docs/design.md).

CPU (default): the kernels run in the Triton interpreter on CPU tensors; tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton.  The interpreter is slow, so tensors are
tiny and the matrix is split: every variant x level set x dtype at a small size, every layout
x codebook count x dtype on one level set, and sampled combinations at 1 and 1003 tokens.

GPU: `FSQ_TEST_DEVICE=cuda pytest tests/test_triton.py` runs the same suite on CUDA tensors
(scripts/gpu_session.sh does that on a GPU machine, with the other GPU checks).
"""

from __future__ import annotations

import itertools
import math
import os
import zlib

import pytest
import torch

from .conftest import (
    GRAD_TOLERANCE,
    LARGE_LEVELS,
    TABLE1_LEVELS,
    TEST_DEVICE,
    VARIANT_CLAMPS,
    assert_matches_reference,
    expected_grad,
)

triton = pytest.importorskip("triton")

if TEST_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)
if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("FSQ_TEST_DEVICE=cuda but no GPU is visible", allow_module_level=True)

import fsq_kernels  # noqa: E402
from fsq_kernels import reference  # noqa: E402
from fsq_kernels.ops import tables  # noqa: E402
from fsq_kernels.ops import triton as triton_backend  # noqa: E402
from fsq_kernels.triton import common as triton_common  # noqa: E402
from fsq_kernels.triton import fsq as K  # noqa: E402

DEV = torch.device(TEST_DEVICE)
LEVEL_SETS = TABLE1_LEVELS + [(2, 3, 4)] + LARGE_LEVELS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cst(levels, variant, hard_clamp, dtype=torch.float32):
    """The constexpr payload the op layer hands the launchers."""
    table = tables.quantize_table(tuple(levels), variant, hard_clamp, dtype)
    return triton_backend.payload(tuple(levels), variant, hard_clamp, tuple(table))


def _z(shape, dtype, seed, scale=1.5, specials=True):
    """Random z on DEV, plus a few exact level-grid and saturating values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if specials and z.numel() >= 8:
        flat = z.view(-1)
        flat[:6] = torch.tensor([0.0, -0.0, 20.0, -20.0, 0.5, -0.5], dtype=torch.float64)
    return z.to(dtype).to(DEV)


def _quantize(z, levels, variant, hard_clamp, channel_first=False, num_codebooks=1, return_indices=True):
    return triton_backend.quantize(z, tuple(levels), variant, hard_clamp, channel_first, num_codebooks,
                                   return_indices)


def _check_forward(z, levels, variant, hc, channel_first=False, ncb=1):
    codes, idx = _quantize(z, levels, variant, hc, channel_first, ncb)
    assert codes.device == z.device and idx.device == z.device
    assert_matches_reference(codes, idx, z, levels, variant=variant, hard_clamp=hc,
                             channel_first=channel_first, num_codebooks=ncb)
    return codes, idx


def _check_backward(z, levels, variant, hc, channel_first=False, ncb=1, grad=None):
    zz = z.detach().clone().requires_grad_(True)
    codes, _ = _quantize(zz, levels, variant, hc, channel_first, ncb, return_indices=False)
    g = torch.randn(z.shape, dtype=torch.float64).to(z.dtype).to(DEV) if grad is None else grad
    (gz,) = torch.autograd.grad(codes, zz, g)
    assert gz.dtype == z.dtype and gz.shape == z.shape
    want = g.detach().cpu().to(torch.float64) * expected_grad(z, levels, variant, hc, channel_first, ncb)
    if z.dtype == torch.float32:
        torch.testing.assert_close(gz.cpu().to(torch.float64), want, **GRAD_TOLERANCE[torch.float32])
    else:
        torch.testing.assert_close(gz.cpu(), want.to(z.dtype), **GRAD_TOLERANCE[z.dtype])


# ---------------------------------------------------------------------------------------------
# Forward: variants x hard_clamp x level sets x dtypes at a small size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
@pytest.mark.parametrize("variant,hc", VARIANT_CLAMPS)
def test_forward_matrix(variant, hc, levels, dtype):
    z = _z((7, len(levels)), dtype, seed=zlib.crc32(repr((variant, hc, levels)).encode()) % 1000)
    _check_forward(z, levels, variant, hc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4), (300, 7)], ids=str)
@pytest.mark.parametrize("variant,hc", VARIANT_CLAMPS)
def test_backward_matrix(variant, hc, levels, dtype):
    z = _z((7, len(levels)), dtype, seed=3)
    _check_backward(z, levels, variant, hc)


# ---------------------------------------------------------------------------------------------
# Layouts (through strides) x codebooks x dtypes
# ---------------------------------------------------------------------------------------------


def _layout(name, C, dtype, seed):
    """(z, channel_first) for one layout; views are made on DEV, never copied."""
    if name == "cl2d":
        return _z((5, C), dtype, seed), False
    if name == "cl3d":
        return _z((2, 3, C), dtype, seed), False
    if name == "cl_sliced":  # token stride 2C+1, channel stride 1
        return _z((5, 2 * C + 1), dtype, seed)[:, 1:C + 1], False
    if name == "cl_transposed":  # channel stride = tokens, token stride 1
        return _z((C, 6), dtype, seed).t(), False
    if name == "cf4d":
        return _z((2, C, 2, 3), dtype, seed), True
    if name == "cf4d_channels_last":  # NHWC memory, NCHW logical
        return _z((2, 2, 3, C), dtype, seed).permute(0, 3, 1, 2), True
    if name == "cf4d_strided":  # every other column and channel block
        return _z((2, 2 * C, 2, 6), dtype, seed)[:, ::2, :, ::2], True
    if name == "cf5d":
        return _z((2, C, 2, 2, 3), dtype, seed), True
    if name == "cf5d_strided":
        return _z((2, C, 4, 4, 3), dtype, seed)[:, :, ::2, ::2, :], True
    if name == "cl5d_strided":  # with 2 codebooks: 5 non-collapsible unit dims -> copy fallback
        return _z((4, 4, 4, 4, C), dtype, seed)[::2, ::2, ::2, ::2], False
    raise ValueError(name)


LAYOUTS = ["cl2d", "cl3d", "cl_sliced", "cl_transposed", "cf4d", "cf4d_channels_last", "cf4d_strided",
           "cf5d", "cf5d_strided", "cl5d_strided"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ncb", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, ncb, dtype):
    levels = (8, 5, 5, 5) if ncb == 1 else (8, 6, 5)
    i = LAYOUTS.index(layout)
    variant, hc = VARIANT_CLAMPS[i % len(VARIANT_CLAMPS)]
    z, cf = _layout(layout, len(levels) * ncb, dtype, seed=i)
    assert not layout.endswith(("sliced", "transposed", "strided", "channels_last")) or not z.is_contiguous()
    codes, idx = _check_forward(z, levels, variant, hc, cf, ncb)
    if z.is_contiguous(memory_format=torch.channels_last) and z.dim() == 4 and not z.is_contiguous():
        assert codes.stride() == z.stride()  # memory format preserved
    _check_backward(z, levels, variant, hc, cf, ncb)
    # decode back to the same layout
    dec = triton_backend.indices_to_codes(idx, levels, variant, cf, ncb, dtype)
    want = reference.indices_to_codes(idx.cpu(), levels, variant=variant, channel_first=cf,
                                      num_codebooks=ncb, dtype=dtype)
    assert dec.shape == want.shape and torch.equal(dec.cpu(), want)


# ---------------------------------------------------------------------------------------------
# Sizes 1 and 1003: sampled combinations (the interpreter is slow)
# ---------------------------------------------------------------------------------------------

SAMPLED = [
    # (tokens, levels, variant, hard_clamp, dtype, layout, ncb)
    (1, (8, 5, 5, 5), "paper", False, torch.float32, "cl", 1),
    (1, (2, 3, 4), "symmetric", True, torch.bfloat16, "cf", 2),
    (1, (300, 7), "atanh", False, torch.float16, "cl", 2),
    (1003, (8, 5, 5, 5), "paper", False, torch.float32, "cl", 1),
    (1003, (8, 8, 8, 5, 5, 5), "atanh", True, torch.bfloat16, "cl", 2),
    (1003, (7, 5, 5, 5, 5), "symmetric", False, torch.float16, "cf", 1),
    (1003, (8, 6, 5), "atanh", False, torch.bfloat16, "cf", 2),
    (1003, (300, 7), "paper", False, torch.float32, "cl", 1),
    (1003, (8, 8, 8, 6, 5), "symmetric", True, torch.float32, "cf", 1),
]


@pytest.mark.parametrize("tokens,levels,variant,hc,dtype,layout,ncb", SAMPLED, ids=str)
def test_sizes(tokens, levels, variant, hc, dtype, layout, ncb):
    C = len(levels) * ncb
    if layout == "cl":
        z, cf = _z((tokens, C), dtype, seed=tokens), False
    else:
        z, cf = _z((1, C, tokens), dtype, seed=tokens), True
    _check_forward(z, levels, variant, hc, cf, ncb)
    _check_backward(z, levels, variant, hc, cf, ncb)


def test_mismatches_only_inside_window_dense():
    """Dense sweep around the level boundaries: float32 vs float64 differences must all lie
    within the window (assert_matches_reference asserts it; this feeds it the hard cases)."""
    for variant, hc in VARIANT_CLAMPS:
        levels = (8, 5, 7)
        bnd = reference.level_boundaries(levels, variant, hc)
        cols = []
        for row in bnd:
            t = torch.tensor([x for x in row if abs(x) < 1e30], dtype=torch.float64)
            eps = torch.tensor([-1e-6, -1e-7, 0.0, 1e-7, 1e-6], dtype=torch.float64)
            vals = (t[:, None] + eps[None, :]).flatten()
            cols.append(vals[torch.arange(30) % vals.numel()])
        z = torch.stack(cols, dim=-1).to(torch.float32).to(DEV)
        _check_forward(z, levels, variant, hc)


def test_symmetric_ties_go_up():
    """symmetric + hard_clamp: boundaries are exact in float32; z on a boundary rounds up."""
    levels = (5, 3)
    z = torch.tensor([[-0.75, -0.5], [-0.25, 0.5], [0.25, 0.0], [0.75, 1.0]], dtype=torch.float32, device=DEV)
    codes, idx = _quantize(z, levels, "symmetric", True)
    want_k = torch.tensor([[1, 1], [2, 2], [3, 1], [4, 2]])
    assert torch.equal(idx.cpu().long(), want_k[:, 0] + 5 * want_k[:, 1])
    assert torch.equal(codes.cpu(), (2 * want_k / torch.tensor([4, 2]) - 1).float())


# ---------------------------------------------------------------------------------------------
# Special values, index dtype, saturation, empty input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant,hc", VARIANT_CLAMPS)
def test_nan_inf(variant, hc, dtype):
    levels = (8, 5, 5, 5)
    z = _z((4, 8), dtype, seed=7, specials=False)
    z[0, 1] = float("nan")  # token 0, codebook 0
    z[1, 4:8] = float("inf")  # token 1, codebook 1: top level
    z[2, 0:4] = float("-inf")  # token 2, codebook 0: bottom level
    z[3, 6] = float("nan")
    z[3, 0] = float("inf")
    codes, idx = _quantize(z, levels, variant, hc, num_codebooks=2)
    c, i = codes.cpu(), idx.cpu()
    assert torch.isnan(c[0, 1]) and not torch.isnan(c[0, [0, 2, 3, 4, 5, 6, 7]]).any()
    assert torch.isnan(c[3, 6]) and torch.isnan(c).sum() == 2
    assert i[0, 0] == -1 and i[0, 1] >= 0 and i[3, 1] == -1 and i[3, 0] >= 0
    assert i[1, 1] == 8 * 5 * 5 * 5 - 1 and i[2, 0] == 0
    top = reference.indices_to_codes(torch.tensor([8 * 5 * 5 * 5 - 1]), levels, variant=variant, dtype=dtype)
    assert torch.equal(c[1, 4:8], top[0]) and torch.equal(c[2, 0:4], -torch.ones(4, dtype=dtype))
    assert_matches_reference(codes, idx, z, levels, variant=variant, hard_clamp=hc, num_codebooks=2)


@pytest.mark.parametrize("variant,hc", [("atanh", False), ("atanh", True), ("symmetric", True), ("symmetric", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_input_gradient_agrees_with_reference_and_cpp(variant, hc, dtype):
    """A NaN input's gradient: 0 with hard_clamp (autograd of the clamp; Triton used to give NaN),
    NaN through tanh; the other elements are untouched. Triton, reference and cpp agree."""
    from fsq_kernels.ops import native

    z = _z((3, 4), dtype, seed=3, specials=False)
    z[0, 1] = float("nan")
    z[2, 3] = float("nan")
    grads = {}
    runs = {"triton": lambda t: _quantize(t, (8, 5, 5, 5), variant, hc),
            "reference": lambda t: reference.quantize(t, (8, 5, 5, 5), variant=variant, hard_clamp=hc)}
    if native.is_available("cpu") and DEV.type == "cpu":
        runs["cpp"] = lambda t: native.quantize(t, (8, 5, 5, 5), variant, hc, False, 1, True)
    for name, run in runs.items():
        zz = z.clone().requires_grad_(True)
        run(zz)[0].float().sum().backward()
        grads[name] = zz.grad.cpu().float()
    nan = torch.isnan(z.cpu())
    for name, g in grads.items():
        if hc:
            assert torch.equal(g[nan], torch.zeros(2)), name
        else:
            assert torch.isnan(g[nan]).all(), name
        assert torch.isfinite(g[~nan]).all(), name
    for name in grads:
        torch.testing.assert_close(grads[name], grads["reference"], rtol=1e-2, atol=0, equal_nan=True)


def test_paper_unreachable_levels_saturate():
    """paper with L >= 1002: the outermost levels are unreachable, +-inf lands on the last
    reachable one, as in the reference (tanh path of the kernel)."""
    levels = (1100, 3)
    z = _z((9, 2), torch.float32, seed=11, scale=4.0)
    z[0, 0], z[1, 0] = float("inf"), float("-inf")
    codes, idx = _check_forward(z, levels, "paper", False)
    assert 0 < int(idx[1]) % 1100 and int(idx[0]) % 1100 < 1099


def test_int64_indices():
    levels = (300, 300, 300, 300)  # 8.1e9 codes > 2^31 - 1
    z = _z((7, 8), torch.float32, seed=5, scale=3.0)
    codes, idx = _check_forward(z, levels, "atanh", False, ncb=2)
    assert idx.dtype == torch.int64 and int(idx.max()) > 0
    dec = triton_backend.indices_to_codes(idx, levels, "atanh", False, 2, torch.float32)
    assert torch.equal(dec.cpu(), reference.indices_to_codes(idx.cpu(), levels, variant="atanh",
                                                             num_codebooks=2))


@pytest.mark.parametrize("layout", ["cl_sliced", "cf4d_strided"])
def test_int64_offset_path(layout, monkeypatch):
    """The 64-bit offset path (tensors past 2^31 elements) forced on a small tensor."""
    monkeypatch.setattr(triton_common, "_FORCE_I64", True)
    levels = (8, 5, 5, 5)
    z, cf = _layout(layout, 4, torch.float32, seed=1)
    codes, idx = _check_forward(z, levels, "paper", False, cf)
    _check_backward(z, levels, "paper", False, cf)
    dec = triton_backend.indices_to_codes(idx, levels, "paper", cf, 1, torch.float32)
    assert torch.equal(dec.cpu(), reference.indices_to_codes(idx.cpu(), levels, channel_first=cf))


def test_return_indices_false():
    z = _z((5, 4), torch.float32, seed=1)
    codes, idx = _quantize(z, (8, 5, 5, 5), "paper", False, return_indices=False)
    assert idx is None
    ref, _ = reference.quantize(z.cpu(), (8, 5, 5, 5))
    assert torch.equal(codes.cpu(), ref)


@pytest.mark.parametrize("shape,cf", [((0, 4), False), ((3, 0, 4), False), ((0, 4, 2, 2), True), ((2, 4, 0, 3), True)])
def test_empty_no_launch(shape, cf):
    def no_launch(kernel):
        raise AssertionError("a kernel was launched for an empty tensor")

    z = torch.empty(shape, device=DEV)
    cst = _cst((8, 5, 5, 5), "paper", False)
    codes, idx = K.fsq_forward(z, cst, K.PAPER, False, cf, 1, True, wrap=no_launch)
    assert codes.shape == z.shape
    assert idx.shape == ((shape[0],) + shape[2:] if cf else shape[:-1]) and idx.dtype == torch.int32
    gz = K.fsq_backward(torch.empty_like(z), z, cst, K.PAPER, False, cf, 1, wrap=no_launch)
    assert gz.shape == z.shape
    dec = K.fsq_decode(idx, cst, K.PAPER, cf, 1, wrap=no_launch)
    assert dec.shape == z.shape
    # and through the op layer
    c2, i2 = fsq_kernels.quantize(z, [8, 5, 5, 5], channel_first=cf, backend="triton")
    assert c2.shape == z.shape and i2.shape == idx.shape


# ---------------------------------------------------------------------------------------------
# Decode: exact inverse on the whole grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_decode_whole_grid(levels):
    n = reference.codebook_size(levels)
    for variant in ("paper", "symmetric"):
        idx = torch.arange(n, dtype=reference.index_dtype(levels), device=DEV)
        codes = triton_backend.indices_to_codes(idx, levels, variant, False, 1, torch.float32)
        want = reference.indices_to_codes(idx.cpu(), levels, variant=variant)
        assert torch.equal(codes.cpu(), want)
        back = reference.codes_to_indices(codes.cpu(), levels, variant=variant)
        assert torch.equal(back.to(torch.int64), idx.cpu().to(torch.int64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_layouts_dtypes(dtype):
    levels = (8, 5, 5, 5)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 1000, (2, 3, 4, 2), generator=g).to(DEV)  # int64, (B, H, W, ncb)
    for cf in (False, True):
        got = triton_backend.indices_to_codes(idx, levels, "atanh", cf, 2, dtype)
        want = reference.indices_to_codes(idx.cpu(), levels, variant="atanh", channel_first=cf,
                                          num_codebooks=2, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got.cpu(), want)
    # non-contiguous index view (transposed batch axes)
    view = idx.transpose(1, 2)
    got = triton_backend.indices_to_codes(view, levels, "paper", True, 2, dtype)
    want = reference.indices_to_codes(view.cpu(), levels, channel_first=True, num_codebooks=2, dtype=dtype)
    assert torch.equal(got.cpu(), want)
    # the -1 sentinel of a NaN token decodes to NaN (CUDA indices are not range-checked)
    sentinel = K.fsq_decode(torch.tensor([-1, 3], device=DEV), _cst(levels, "paper", False), K.PAPER, False, 1)
    assert torch.isnan(sentinel[0]).all() and not torch.isnan(sentinel[1]).any()


# ---------------------------------------------------------------------------------------------
# Constants, registration, availability
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,hc", VARIANT_CLAMPS)
def test_constexpr_boundaries_are_the_table(variant, hc):
    """The kernel's BOUNDS constexprs are the table's float32 comparison boundaries (finite, as
    constexprs must be), and the tanh path carries none."""
    for levels in LEVEL_SETS:
        c = _cst(levels, variant, hc)
        if not c["USE_CMP"]:
            assert c["BOUNDS"] == ()  # tanh path
            continue
        k0, rows = reference.comparison_boundaries(levels, variant, hc, torch.float32)
        assert k0 == [0] * len(levels)
        assert [list(row) for row in c["BOUNDS"]] == rows
        assert all(math.isfinite(t) for row in rows for t in row)


def test_launchers_run_on_the_tensors_device(monkeypatch):
    """Every launch sits in a device guard for its input's device (multi-GPU: not the current
    device); on_device picks torch.cuda.device for CUDA tensors and nothing otherwise."""
    import contextlib
    import types

    from fsq_kernels.triton import residual as R

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: entered.append(dev) or contextlib.nullcontext())
    K.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    K.on_device(torch.empty(1))
    assert entered == [torch.device("cuda", 1)]

    guarded = []

    def recording_guard(t):
        guarded.append(t.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(K, "on_device", recording_guard)
    monkeypatch.setattr(R, "on_device", recording_guard)

    def capture(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *a, **kw: None
        return _Grid()

    z = torch.empty(16, 4, device="meta")
    cst = _cst((8, 5, 5, 5), "paper", False)
    K.fsq_forward(z, cst, K.PAPER, False, False, 1, True, wrap=capture)
    K.fsq_backward(z, z, cst, K.PAPER, False, False, 1, wrap=capture)
    K.fsq_decode(torch.empty(16, dtype=torch.int32, device="meta"), cst, K.PAPER, False, 1, wrap=capture)
    rtable = tables.residual_table((8, 5, 5, 5), 2, True, torch.float32)
    rcst = triton_backend.payload((8, 5, 5, 5), "symmetric", True, tuple(rtable), None, 2)
    R.residual_forward(z, rcst, True, False, None, wrap=capture)
    R.residual_backward(z, z, rcst, True, False, None, wrap=capture)
    assert guarded == [torch.device("meta")] * 5


def test_opcheck():
    z = _z((2, 8, 2, 3), torch.float32, seed=2).requires_grad_(True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEV.type == "cuda":
        tests = tests + ("test_aot_dispatch_dynamic",)  # tracing runs the kernels: not in the interpreter
    table = tables.quantize_table((8, 5, 5, 5), "atanh", True, torch.float32)
    torch.library.opcheck(torch.ops.fsq_triton.quantize.default,
                          (z, [8, 5, 5, 5], "atanh", True, True, 2, True, table), test_utils=tests)
    table = tables.quantize_table((8, 5, 5, 5), "paper", False, torch.float32)
    torch.library.opcheck(torch.ops.fsq_triton.quantize_backward.default,
                          (torch.randn_like(z), z.detach(), [8, 5, 5, 5], "paper", False, True, 2, table),
                          test_utils=tests)
    idx = torch.randint(0, 1000, (2, 2, 3, 2), device=DEV, dtype=torch.int32)
    torch.library.opcheck(torch.ops.fsq_triton.indices_to_codes.default,
                          (idx, [8, 5, 5, 5], "paper", True, 2, torch.bfloat16, table), test_utils=tests)


def test_saves_only_z():
    z = _z((5, 4), torch.bfloat16, seed=4).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        codes, _ = _quantize(z, (8, 5, 5, 5), "paper", False)
    assert len(saved) == 1 and saved[0].dtype == torch.bfloat16 and saved[0].shape == z.shape


def test_public_api_backend_triton():
    z = _z((2, 4, 3, 3), torch.float32, seed=9).requires_grad_(True)
    codes, idx = fsq_kernels.quantize(z, [8, 5, 5, 5], channel_first=True, backend="triton")
    ref_codes, ref_idx = fsq_kernels.quantize(z.detach().cpu(), [8, 5, 5, 5], channel_first=True,
                                              backend="reference")
    assert torch.equal(codes.detach().cpu(), ref_codes) and torch.equal(idx.cpu(), ref_idx)
    codes.sum().backward()
    want = expected_grad(z, (8, 5, 5, 5), "paper", False, True, 1)
    torch.testing.assert_close(z.grad.cpu().double(), want, **GRAD_TOLERANCE[torch.float32])


def test_is_available():
    assert triton_backend.is_available(DEV.type)
    assert not triton_backend.is_available("mps")
    assert "triton" in fsq_kernels.available_backends()


def test_module_product_coverage():
    """Guard against silently shrinking the matrix above (counts of parametrized cases)."""
    assert len(list(itertools.product(VARIANT_CLAMPS, LEVEL_SETS, DTYPES))) == 105
    assert {s[0] for s in SAMPLED} == {1, 1003}


# ---------------------------------------------------------------------------------------------
# GPU only: torch.compile and no host-device sync (the interpreter cannot be traced)
# ---------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(DEV.type != "cuda", reason="needs CUDA tensors (FSQ_TEST_DEVICE=cuda)")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_fullgraph(dtype):
    levels = (8, 5, 5, 5)

    def f(z):
        codes, idx = triton_backend.quantize(z, levels, "paper", False, True, 2, True)
        return codes * 2, idx

    z = _z((2, 8, 16, 16), dtype, seed=12).requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True)
    c1, i1 = compiled(z)
    c0, i0 = f(z)
    assert torch.equal(c1, c0) and torch.equal(i1, i0)
    (g1,) = torch.autograd.grad(c1.sum(), z)
    (g0,) = torch.autograd.grad(c0.sum(), z)
    assert torch.equal(g1, g0)


@cuda_only
def test_no_host_sync():
    z = _z((4, 8, 16, 16), torch.bfloat16, seed=13).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        codes, idx = triton_backend.quantize(z, (8, 5, 5, 5), "atanh", True, True, 2, True)
        codes.backward(torch.ones_like(codes))
        triton_backend.indices_to_codes(idx, (8, 5, 5, 5), "atanh", True, 2, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
