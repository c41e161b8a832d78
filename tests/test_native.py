"""The C++ extension (`fsq_kernels._C`, csrc/) on CPU against the float64 reference.

Skipped as a whole when the extension is not built. CUDA kernels are exercised by the op-level
tests when FSQ_TEST_DEVICE=cuda (here: CPU kernels only, for real).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from fsq_kernels import reference
from fsq_kernels.ops import native, tables

from .conftest import (
    GRAD_TOLERANCE,
    LARGE_LEVELS,
    TABLE1_LEVELS,
    VARIANT_CLAMPS,
    assert_matches_reference,
    expected_grad,
    on_device,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(levels, variant, hard_clamp, dtype=torch.float32):
    return tables.quantize_table(tuple(levels), variant, hard_clamp, dtype)

pytestmark = pytest.mark.skipif(not native.is_available("cpu"), reason="fsq_kernels._C is not built")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LEVEL_SETS = TABLE1_LEVELS + [(2, 3, 4)] + LARGE_LEVELS
LAYOUTS = ["cl2d", "cl3d", "cf4d", "cf5d", "cl_strided", "cf_channels_last", "cl_transposed"]


def make_z(layout: str, n: int, channels: int, dtype: torch.dtype, seed: int = 0, scale: float = 1.5):
    """z of about n tokens in one of the layouts; returns (z, channel_first)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if layout == "cl2d":
        return rnd(n, channels), False
    if layout == "cl3d":
        return rnd(2, n, channels), False
    if layout == "cf4d":
        return rnd(2, channels, n, 3), True
    if layout == "cf5d":
        return rnd(1, channels, 2, n, 2), True
    if layout == "cl_strided":  # channel stride 2, token stride 2C
        return rnd(n, 2 * channels)[:, ::2], False
    if layout == "cf_channels_last":  # (B, C, H, W) stored channels-last: a permuted dense view
        return rnd(2, channels, 3, n).contiguous(memory_format=torch.channels_last), True
    if layout == "cl_transposed":  # (n, C) view of a (C, n) tensor: channel stride n
        return rnd(channels, n).t(), False
    raise AssertionError(layout)


def inject_specials(z: torch.Tensor, levels, variant: str, hard_clamp: bool, channel_first: bool) -> torch.Tensor:
    """Exact float-cast level boundaries (the tie rule), +-inf and a NaN, written into z (in place,
    through a channel-last view, whatever z's layout)."""
    x = z.movedim(1, -1) if channel_first else z
    token_shape = x.shape[:-1]
    if math.prod(token_shape) < 4:
        return z

    def token(t):
        return tuple(int(i) for i in np.unravel_index(t, token_shape))

    d = len(levels)
    bounds = reference.level_boundaries(levels, variant, hard_clamp)
    for i in range(d):
        finite = [b for b in bounds[i] if abs(b) != float("inf")]
        if finite:
            x[token(0) + (i,)] = torch.tensor(finite[len(finite) // 2], dtype=torch.float64).to(z.dtype)
    x[token(1) + (0,)] = float("inf")
    x[token(2) + (x.shape[-1] - 1,)] = float("-inf")
    x[token(3) + (d - 1,)] = float("nan")
    return z


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
def test_forward_matrix(variant, hard_clamp, levels, dtype):
    """Every layout x num_codebooks at a small size, with boundary values, inf and NaN."""
    for layout in LAYOUTS:
        for num_codebooks in (1, 2):
            channels = len(levels) * num_codebooks
            z, channel_first = make_z(layout, 7, channels, dtype, seed=hash((layout, num_codebooks)) % 1000)
            if layout in ("cl2d", "cf4d", "cl_transposed", "cf_channels_last"):
                z = inject_specials(z, levels, variant, hard_clamp, channel_first)
            codes, indices = native.quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks, True)
            assert codes.stride() == torch.empty_like(z).stride()
            assert_matches_reference(
                codes, indices, z, levels, variant=variant, hard_clamp=hard_clamp,
                channel_first=channel_first, num_codebooks=num_codebooks,
            )


@pytest.mark.parametrize("n", [1, 7, 1003])
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (300, 7)], ids=str)
@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
def test_forward_sizes(variant, hard_clamp, levels, n):
    for dtype, layout, num_codebooks in [(torch.float32, "cl2d", 1), (torch.bfloat16, "cf4d", 2),
                                         (torch.float64, "cl_strided", 2)]:
        z, channel_first = make_z(layout, n, len(levels) * num_codebooks, dtype, seed=n, scale=2.5)
        codes, indices = native.quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks, True)
        assert_matches_reference(codes, indices, z, levels, variant=variant, hard_clamp=hard_clamp,
                                 channel_first=channel_first, num_codebooks=num_codebooks)
        codes_only, none = native.quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks, False)
        assert none is None
        assert torch.equal(codes_only.nan_to_num(7.0), codes.nan_to_num(7.0))


def test_window_is_the_only_mismatch_dense():
    """Dense sweep across the boundaries of [8,5,5,5]: mismatches only inside the window."""
    levels = (8, 5, 5, 5)
    z = torch.linspace(-4, 4, 200_001, dtype=torch.float32).unsqueeze(-1).expand(-1, 4).contiguous()
    for variant, hard_clamp in VARIANT_CLAMPS:
        codes, indices = native.quantize(z, levels, variant, hard_clamp, False, 1, True)
        assert_matches_reference(codes, indices, z, levels, variant=variant, hard_clamp=hard_clamp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
def test_backward(variant, hard_clamp, dtype):
    tol = GRAD_TOLERANCE[dtype]
    for levels in [(8, 5, 5, 5), (2, 3, 4), (300, 7)]:
        for layout, num_codebooks in [("cl2d", 1), ("cf4d", 2), ("cl_transposed", 1), ("cf_channels_last", 2)]:
            z, channel_first = make_z(layout, 33, len(levels) * num_codebooks, dtype, seed=3)
            z.requires_grad_(True)
            codes, _ = native.quantize(z, levels, variant, hard_clamp, channel_first, num_codebooks, True)
            g = torch.randn(codes.shape, dtype=torch.float64).to(dtype)
            (grad_z,) = torch.autograd.grad(codes, z, g)
            assert grad_z.dtype == dtype and grad_z.shape == z.shape
            want = g.to(torch.float64) * expected_grad(z, levels, variant, hard_clamp, channel_first, num_codebooks)
            if dtype in (torch.float32, torch.float64):
                torch.testing.assert_close(grad_z.to(torch.float64), want, **tol)
            else:
                torch.testing.assert_close(grad_z, want.to(dtype))


def test_backward_expanded_grad_and_nan():
    """sum().backward() hands the kernel a stride-0 grad; a NaN z has a NaN (tanh) gradient."""
    z = torch.randn(5, 8, dtype=torch.float32)
    z[0, 0] = float("nan")
    z.requires_grad_(True)
    codes, _ = native.quantize(z, (8, 5, 5, 5), "paper", False, False, 2, False)
    codes.sum().backward()
    want = expected_grad(z, (8, 5, 5, 5), "paper", False, False, 2)
    torch.testing.assert_close(z.grad.double(), want, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert torch.isnan(z.grad[0, 0])


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_decode_whole_grid(levels):
    size = reference.codebook_size(levels)
    idx = torch.arange(size, dtype=reference.index_dtype(levels))
    for variant in ("paper", "symmetric"):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            codes = native.indices_to_codes(idx, levels, variant, False, 1, dtype)
            want = reference.indices_to_codes(idx, levels, variant=variant, dtype=dtype)
            assert codes.dtype == dtype
            assert torch.equal(codes, want)
        codes = native.indices_to_codes(idx, levels, variant, False, 1, torch.float32)
        assert torch.equal(reference.codes_to_indices(codes, levels, variant=variant), idx)
        # symmetric + hard_clamp maps the grid onto itself: quantize(decode(i)) == i
        if variant == "symmetric":
            _, back = native.quantize(codes, levels, variant, True, False, 1, True)
            assert torch.equal(back, idx)


def test_decode_layouts_and_codebooks():
    levels = (8, 5, 5, 5)
    idx = torch.randint(0, 1000, (2, 3, 4, 2), dtype=torch.int64)
    for channel_first in (False, True):
        got = native.indices_to_codes(idx, levels, "atanh", channel_first, 2, torch.float16)
        want = reference.indices_to_codes(idx, levels, variant="atanh", channel_first=channel_first,
                                          num_codebooks=2, dtype=torch.float16)
        assert got.shape == want.shape and torch.equal(got, want)
    # non-contiguous int32 indices
    idx32 = torch.randint(0, 1000, (6, 4), dtype=torch.int32).t()
    torch.testing.assert_close(native.indices_to_codes(idx32, levels, "paper", False, 1, None),
                               reference.indices_to_codes(idx32, levels), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, 1000])
def test_decode_out_of_range_is_value_error(bad):
    idx = torch.tensor([0, 5, bad, 7])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        torch.ops.fsq.indices_to_codes(idx, [8, 5, 5, 5], "paper", False, 1, torch.float32,
                                       _table((8, 5, 5, 5), "paper", False))


def test_int64_indices():
    levels = (65536, 65537)  # prod > 2^31 - 1
    z = torch.randn(100, 2, dtype=torch.float64) * 3
    codes, indices = native.quantize(z, levels, "atanh", False, False, 1, True)
    assert indices.dtype == torch.int64
    assert_matches_reference(codes, indices, z, levels, variant="atanh")
    back = native.indices_to_codes(indices, levels, "atanh", False, 1, torch.float64)
    assert torch.equal(back, reference.indices_to_codes(indices, levels, variant="atanh", dtype=torch.float64))


def test_paper_large_level_unreachable_ends():
    """paper with L >= 1002: infinite boundaries; -inf/+inf land on the outermost reachable levels."""
    levels = (1500, 3)
    z = torch.tensor([[float("-inf"), 0.0], [float("inf"), 0.0], [-30.0, 1.0], [30.0, -1.0], [0.1, 0.2]])
    codes, indices = native.quantize(z, levels, "paper", False, False, 1, True)
    assert_matches_reference(codes, indices, z, levels, variant="paper")
    _, ref_i = reference.quantize(z.double(), levels, variant="paper")
    assert torch.equal(indices[:2], ref_i[:2]) and bool((indices >= 0).all())
    k = indices % 1500  # level index of channel 0
    assert 0 < k[0] < 1500 // 2 < k[1] < 1499  # the outermost levels are out of reach


def test_nan_inf_empty():
    levels = (8, 5, 5, 5)
    z = torch.zeros(3, 8)
    z[0, 1] = float("nan")  # codebook 0 of token 0
    z[1, 4] = float("inf")
    z[2, 7] = float("-inf")
    codes, indices = native.quantize(z, levels, "paper", False, False, 2, True)
    assert indices[0, 0] == -1 and indices[0, 1] >= 0
    assert torch.isnan(codes[0, 1]) and not torch.isnan(codes[0, [0, 2, 3]]).any()
    assert codes[1, 4] == 0.75 and codes[2, 7] == -1.0
    for shape, channel_first in [((0, 4), False), ((2, 4, 0, 3), True), ((0, 4, 5), True)]:
        z = torch.empty(shape)
        codes, indices = native.quantize(z, levels, "paper", False, channel_first, 1, True)
        assert codes.shape == z.shape
        assert indices.shape == reference.quantize(z, levels, channel_first=channel_first)[1].shape
        gz = torch.ops.fsq.quantize_backward(codes, z, list(levels), "paper", False, channel_first, 1,
                                             _table(levels, "paper", False))
        assert gz.shape == z.shape
    out = native.indices_to_codes(torch.empty(0, 3, dtype=torch.int32), levels, "paper", True, 1, None)
    assert out.shape == (0, 4, 3)


def test_bitwise_deterministic_across_runs_and_threads():
    levels = (8, 5, 5, 5)
    z = torch.randn(1 << 16, 8) * 2
    g = torch.randn_like(z)
    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            table = _table(levels, "paper", False)
            c, i = torch.ops.fsq.quantize(z, list(levels), "paper", False, False, 2, True, table)
            gz = torch.ops.fsq.quantize_backward(g, z, list(levels), "paper", False, False, 2, table)
            dec = torch.ops.fsq.indices_to_codes(i, list(levels), "paper", False, 2, torch.float32, table)
            outs.append((c, i, gz, dec))
    finally:
        torch.set_num_threads(prev)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_errors_name_the_argument():
    z = torch.randn(4, 4)
    table = _table((8, 5, 5, 5), "paper", False)

    def q(*args):
        return torch.ops.fsq.quantize(*args, table)

    with pytest.raises(ValueError, match="levels"):
        q(z, [], "paper", False, False, 1, True)
    with pytest.raises(ValueError, match="level"):
        q(z, [8, 1, 5, 5], "paper", False, False, 1, True)
    with pytest.raises(ValueError, match="hard_clamp"):
        q(z, [8, 5, 5, 5], "paper", True, False, 1, True)
    with pytest.raises(ValueError, match="variant"):
        q(z, [8, 5, 5, 5], "tanh", False, False, 1, True)
    with pytest.raises(ValueError, match="channels"):
        q(z, [8, 5, 5], "paper", False, False, 1, True)
    with pytest.raises(ValueError, match="num_codebooks"):
        q(z, [8, 5, 5, 5], "paper", False, False, 0, True)
    with pytest.raises(TypeError, match="z must be a floating tensor"):
        q(torch.ones(4, 4, dtype=torch.int64), [8, 5, 5, 5], "paper", False, False, 1, True)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        torch.ops.fsq.indices_to_codes(torch.ones(4), [8, 5, 5, 5], "paper", False, 1, torch.float32, table)
    with pytest.raises(ValueError, match="num_codebooks"):
        torch.ops.fsq.indices_to_codes(torch.ones(4, 3, dtype=torch.int64), [8, 5, 5, 5], "paper", False, 2,
                                       torch.float32, table)
    with pytest.raises(ValueError, match="table does not match levels"):
        torch.ops.fsq.quantize(z, [8, 5, 5, 5], "paper", False, False, 1, True, _table((8, 5, 5, 7), "paper", False))
    with pytest.raises(ValueError, match="table must end with 0 values after the boundaries"):
        torch.ops.fsq.quantize(z, [8, 5, 5, 5], "paper", False, False, 1, True, table + [0.0])


OPCHECK_CASES = [
    ((torch.float32, "cl2d", 1, (8, 5, 5, 5), "paper", False, True)),
    ((torch.bfloat16, "cf4d", 2, (8, 6, 5), "symmetric", True, True)),
    ((torch.float64, "cl_strided", 1, (300, 7), "atanh", False, False)),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_opcheck(case):
    dtype, layout, num_codebooks, levels, variant, hard_clamp, return_indices = case
    z, channel_first = make_z(layout, 9, len(levels) * num_codebooks, dtype, seed=1)
    z.requires_grad_(True)
    table = tables.quantize_table(levels, variant, hard_clamp, dtype)
    args = (z, list(levels), variant, hard_clamp, channel_first, num_codebooks, return_indices, table)
    torch.library.opcheck(torch.ops.fsq.quantize.default, args)
    g = torch.randn(z.shape).to(dtype)
    torch.library.opcheck(torch.ops.fsq.quantize_backward.default,
                          (g, z.detach(), list(levels), variant, hard_clamp, channel_first, num_codebooks, table))
    _, idx = native.quantize(z.detach(), levels, variant, hard_clamp, channel_first, num_codebooks, True)
    torch.library.opcheck(torch.ops.fsq.indices_to_codes.default,
                          (idx, list(levels), variant, channel_first, num_codebooks, dtype,
                           tables.quantize_table(levels, variant, False, dtype)))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    levels = (8, 5, 5, 5)

    def f(z):
        codes, indices = native.quantize(z, levels, "paper", False, True, 1, True)
        return (codes * 2).sum(), indices

    z = torch.randn(2, 4, 5, 6, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    loss, indices = compiled(z)
    loss.backward()
    grad = z.grad.clone()
    z.grad = None
    loss_ref, indices_ref = f(z)
    loss_ref.backward()
    assert torch.equal(indices, indices_ref)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, z.grad)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (run only where the extension was built with CUDA and a GPU is visible): they
# compare z against the same float32 boundaries as the CPU kernels, so indices and codes must be
# identical to the CPU kernels' bit for bit; gradients agree to float32 rounding.
# ---------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not native.is_available("cuda"), reason="extension built without CUDA or no GPU")

CUDA_CASES = [
    # (levels, num_codebooks, layout, dtype): [8,5,5,5] fp32 channel-last and 8 bf16 channels take
    # the 128-bit path; the others the strided one; (1500, 3) keeps its boundaries in device memory
    ((8, 5, 5, 5), 1, "cl2d", torch.float32),
    ((8, 5, 5, 5), 2, "cf4d", torch.float16),
    ((8, 8, 8, 6, 5, 5, 5, 5), 1, "cl3d", torch.bfloat16),
    ((7, 5, 5, 5, 5), 1, "cl_strided", torch.float32),
    ((300, 7), 2, "cf_channels_last", torch.float32),
    ((1500, 3), 1, "cl_transposed", torch.bfloat16),
]


@cuda_only
@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
def test_cuda_matches_cpu(case, variant, hard_clamp):
    levels, num_codebooks, layout, dtype = case
    if variant != "paper" and 1500 in levels:
        pytest.skip("large-L case only for paper")
    z, channel_first = make_z(layout, 1003, len(levels) * num_codebooks, dtype, seed=5, scale=2.0)
    inject_specials(z, levels, variant, hard_clamp, channel_first)
    zc = on_device(z, "cuda")  # the same (possibly non-dense) view, so the strided CUDA paths run
    args = (levels, variant, hard_clamp, channel_first, num_codebooks)
    codes, indices = native.quantize(z, *args, True)
    codes_c, indices_c = native.quantize(zc, *args, True)
    assert codes_c.stride() == torch.empty_like(zc).stride()
    assert torch.equal(indices_c.cpu(), indices)
    assert torch.equal(codes_c.cpu().nan_to_num(9.0), codes.nan_to_num(9.0))
    g = torch.randn(z.shape).to(dtype)
    table = tables.quantize_table(levels, variant, hard_clamp, z.dtype)
    gz = torch.ops.fsq.quantize_backward(g, z, list(levels), variant, hard_clamp, channel_first, num_codebooks, table)
    gz_c = torch.ops.fsq.quantize_backward(g.cuda(), zc, list(levels), variant, hard_clamp, channel_first, num_codebooks,
                                           table)
    torch.testing.assert_close(gz_c.cpu(), gz, equal_nan=True, rtol=1e-5 if dtype == torch.float32 else None,
                               atol=1e-7 if dtype == torch.float32 else None)
    ok = indices.clamp_min(0)
    dec = native.indices_to_codes(ok, levels, variant, channel_first, num_codebooks, dtype)
    dec_c = native.indices_to_codes(ok.cuda(), levels, variant, channel_first, num_codebooks, dtype)
    assert torch.equal(dec_c.cpu(), dec)


def _permuted_small_indices(dtype, device):
    """(2, 5, 3, 2) indices of levels (4, 3, 2) as a permuted (non-contiguous) view, ncb = 2."""
    g = torch.Generator().manual_seed(4)
    base = torch.randint(0, 24, (3, 2, 5, 2), generator=g).to(dtype)
    return base.permute(1, 2, 0, 3).to(device)  # strides of a transposed layout


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_decode_permuted_small_integer_indices(dtype, device):
    """Permuted int8/uint8/int16 indices: the kernels read them densely (fsq_common.h dense_indices:
    a widening .to() alone keeps the permuted strides)."""
    levels = (4, 3, 2)
    idx = _permuted_small_indices(dtype, device)
    assert not idx.is_contiguous()
    for channel_first in (False, True):
        got = native.indices_to_codes(idx, levels, "symmetric", channel_first, 2, torch.float32)
        want = reference.indices_to_codes(idx.cpu().long(), levels, variant="symmetric",
                                          channel_first=channel_first, num_codebooks=2)
        assert torch.equal(got.cpu(), want)


@cuda_only
def test_cuda_decode_out_of_range_is_nan_and_autograd():
    levels = (8, 5, 5, 5)
    idx = torch.tensor([0, -1, 1000, 999], device="cuda", dtype=torch.int32)
    codes = native.indices_to_codes(idx, levels, "paper", False, 1, torch.float32)
    assert torch.isnan(codes[1:3]).all() and not torch.isnan(codes[[0, 3]]).any()
    z = torch.randn(64, 4, device="cuda", requires_grad=True)
    out, _ = native.quantize(z, levels, "paper", False, False, 1, True)
    out.sum().backward()
    want = expected_grad(z, levels, "paper", False, False, 1)
    torch.testing.assert_close(z.grad.cpu().double(), want, rtol=1e-4, atol=1e-6)
    empty = native.quantize(torch.empty(0, 4, device="cuda"), levels, "paper", False, False, 1, True)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


def test_backward_ops_check_gradient_shape_and_dtype():
    """Both backward ops name the gradient, the expected shape/dtype and the actual one."""
    z = torch.randn(3, 4)
    levels = [8, 5, 5, 5]
    table = _table(levels, "paper", False)
    rtable = tables.residual_table(tuple(levels), 2, True, torch.float32)
    with pytest.raises(ValueError, match=r"grad_codes must have the shape of z \[3, 4\], got \[3, 5\]"):
        torch.ops.fsq.quantize_backward(torch.randn(3, 5), z, levels, "paper", False, False, 1, table)
    with pytest.raises(TypeError, match=r"grad_codes must have the dtype of z \(Float\), got Double"):
        torch.ops.fsq.quantize_backward(z.double(), z, levels, "paper", False, False, 1, table)
    with pytest.raises(ValueError, match=r"grad_out must have the shape of x \[3, 4\], got \[2, 4\]"):
        torch.ops.fsq.residual_quantize_backward(torch.randn(2, 4), z, levels, 2, True, None, False, None, rtable)
    with pytest.raises(TypeError, match=r"grad_out must have the dtype of x \(Float\), got BFloat16"):
        torch.ops.fsq.residual_quantize_backward(z.bfloat16(), z, levels, 2, True, None, False, None, rtable)


def _cuobjdump():
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(not native.with_cuda() or _cuobjdump() is None, reason="extension built without CUDA, or no cuobjdump")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_rows_are_read_with_vector_loads(arch):
    """Static check of the built extension (no GPU needed): the forward and backward kernels have
    a 64-bit vector load path (8-byte rows: [8,5,5,5] in bfloat16/float16) and a 128-bit one
    (16-byte rows: [8,5,5,5] in float32), in the SASS, for each of several items per thread."""
    import subprocess

    from fsq_kernels import _C

    sass = subprocess.run([_cuobjdump(), "-sass", "-arch", arch, _C.__file__], capture_output=True, text=True,
                          check=True).stdout
    functions = {chunk.split("\n", 1)[0].strip(): chunk for chunk in sass.split("Function : ")[1:]}
    for kernel in ("fsq_forward_kernel", "fsq_backward_kernel"):
        for dtype in ("IN3c108BFloat16EE", "IN3c104HalfEE", "IfE"):  # mangled template arguments
            bodies = [b for name, b in functions.items() if kernel + dtype in name]
            assert len(bodies) == 1, (kernel, dtype, list(functions))
            assert "LDG.E.128" in bodies[0], (kernel, dtype)
            if dtype != "IfE":
                assert "LDG.E.64" in bodies[0], (kernel, dtype)
    # several work items per thread: the bf16 8-byte path holds kMaxChannels * 2 / 8 guarded
    # 64-bit loads per item and operand, for each of the kernel's items of a round
    def constant(path, name):
        return int(re.search(rf"constexpr int {name} = (\d+);", open(os.path.join(ROOT, "csrc", path)).read()).group(1))

    per_item = constant("fsq_math.h", "kMaxChannels") * 2 // 8
    for kernel, items, operands in (("fsq_forward_kernel", constant("fsq_cuda_rows.cuh", "kForwardItems"), 1),
                                    ("fsq_backward_kernel", constant("fsq_cuda_rows.cuh", "kBackwardItems"), 2)):
        assert items >= 2, (kernel, items)
        body = next(b for name, b in functions.items() if kernel + "IN3c108BFloat16EE" in name)
        assert body.count("LDG.E.64") >= items * operands * per_item, (kernel, body.count("LDG.E.64"))


# ---------------------------------------------------------------------------------------------
# fsq::quantize_train (dither and usage histogram fused into the forward) and the dithered
# fsq::quantize_backward, called directly, against the reference chain: reference.quantize, then
# fsq_kernels.dither.apply with the same [key, offset], then torch.bincount.
# ---------------------------------------------------------------------------------------------
DITHER_MODES = {0: None, 1: "peer", 2: "taae"}


def _train_args(z, levels, channel_first, num_codebooks, mode, p, key_offset, return_usage, variant="symmetric"):
    from fsq_kernels import dither

    steps = list(dither.steps(levels)) if mode else []
    return (z, list(levels), variant, False, channel_first, num_codebooks, _table(levels, variant, False, z.dtype),
            key_offset if mode else None, mode, p, steps, return_usage)


def _reference_chain(z, levels, channel_first, num_codebooks, mode, p, key_offset, variant="symmetric"):
    from fsq_kernels import dither

    codes, indices = reference.quantize(z, levels, variant=variant, channel_first=channel_first,
                                        num_codebooks=num_codebooks)
    if mode:
        codes = dither.apply(codes, z, levels, DITHER_MODES[mode], p, key_offset, channel_first)
    return codes, indices


def _bincount(indices, num_codebooks, size):
    flat = indices.reshape(-1, num_codebooks)
    return torch.stack([torch.bincount(col[col >= 0], minlength=size) for col in flat.unbind(1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["none", "peer", "taae"])
def test_quantize_train_matches_reference_chain(mode, dtype):
    from fsq_kernels import dither

    levels = (8, 5, 5, 5)
    cases = [("cl3d", 1, True), ("cf4d", 2, True), ("cl_strided", 1, False), ("cf_channels_last", 2, True),
             ("cl_transposed", 2, False), ("cl2d", 1, True)]
    for n, (layout, num_codebooks, return_usage) in zip([7, 1, 13, 5, 3, 1], cases):
        z, channel_first = make_z(layout, n, len(levels) * num_codebooks, dtype, seed=n)
        inject_specials(z, levels, "symmetric", False, channel_first)
        key_offset = dither.draw_key_offset("cpu", torch.Generator().manual_seed(n))
        codes, indices, usage = torch.ops.fsq.quantize_train(
            *_train_args(z, levels, channel_first, num_codebooks, mode, 0.5, key_offset, return_usage))
        want_codes, want_indices = _reference_chain(z, levels, channel_first, num_codebooks, mode, 0.5, key_offset)
        assert codes.dtype == dtype and codes.shape == z.shape and codes.stride() == torch.empty_like(z).stride()
        assert torch.equal(indices, want_indices), layout
        if mode == 2:  # only the tanh of the unquantized branches is the backend's own (a few ulps)
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(codes, want_codes, rtol=4 * eps, atol=4 * eps, equal_nan=True)
        else:
            torch.testing.assert_close(codes, want_codes, rtol=0, atol=0, equal_nan=True)
        if return_usage:
            assert usage.dtype == torch.int64 and usage.shape == (num_codebooks, math.prod(levels))
            assert torch.equal(usage, _bincount(want_indices, num_codebooks, math.prod(levels)))
            assert int(usage.sum()) == int((want_indices >= 0).sum())  # the NaN token's -1 is skipped
        else:
            assert usage.shape == (0,) and usage.dtype == torch.int64


def test_quantize_train_noise_depends_on_the_logical_position_only():
    """The same logical z in three memory layouts gets the same noise; another offset another one."""
    from fsq_kernels import dither

    levels = (8, 5, 5, 5)
    z = torch.randn(2, 8, 9, 5)
    key_offset = torch.tensor([123, 456], dtype=torch.int64)
    outs = [torch.ops.fsq.quantize_train(*_train_args(x, levels, True, 2, 1, 1.0, key_offset, False))[0]
            for x in (z, z.contiguous(memory_format=torch.channels_last), z.transpose(2, 3).contiguous().transpose(2, 3))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # counter = offset + i: offset + 1 gives element i the noise of element i + 1 (row-major, logical)
    shifted = torch.ops.fsq.quantize_train(*_train_args(z, levels, True, 2, 1, 1.0, key_offset + torch.tensor([0, 1]),
                                                        False))[0].flatten()
    codes = torch.ops.fsq.quantize(z, list(levels), "symmetric", False, True, 2, False,
                                   _table(levels, "symmetric", False))[0].flatten()
    noise = dither.element_uniforms(z.shape, key_offset)[0].flatten() - 0.5
    assert torch.equal(shifted[:-1], (codes[:-1] + noise[1:]).clamp(-1, 1))
    assert not torch.equal(shifted, outs[0].flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", [1, 2], ids=["peer", "taae"])
def test_quantize_train_backward_matches_autograd_of_the_chain(mode, dtype):
    from fsq_kernels import dither

    levels = (8, 5, 5, 5)
    for layout, num_codebooks, variant in [("cf4d", 2, "symmetric"), ("cl_strided", 1, "symmetric"),
                                           ("cl3d", 1, "atanh")]:
        z, channel_first = make_z(layout, 11, len(levels) * num_codebooks, dtype, seed=5)
        key_offset = dither.draw_key_offset("cpu", torch.Generator().manual_seed(7))
        z.requires_grad_(True)
        want_codes, _ = _reference_chain(z, levels, channel_first, num_codebooks, mode, 0.5, key_offset, variant)
        g = torch.randn(z.shape, dtype=torch.float64).to(dtype)
        (want,) = torch.autograd.grad(want_codes, z, g)
        args = _train_args(z.detach(), levels, channel_first, num_codebooks, mode, 0.5, key_offset, False, variant)
        got = torch.ops.fsq.quantize_backward(g, *args[:11])
        assert got.dtype == dtype and got.shape == z.shape
        tol = GRAD_TOLERANCE[dtype] if dtype != torch.bfloat16 else {"rtol": 0.016, "atol": 1e-2}
        torch.testing.assert_close(got, want, **tol)
        assert torch.equal(got == 0, want == 0)  # the peer clamp's mask is exact
        # dither_mode 0 is quantize's backward
        plain = torch.ops.fsq.quantize_backward(g, *args[:7])
        assert torch.equal(plain, torch.ops.fsq.quantize_backward(g, *args[:7], None, 0, 0.0, []))


def test_quantize_train_empty_and_deterministic_across_threads():
    levels = (8, 5, 5, 5)
    key_offset = torch.tensor([5, -7], dtype=torch.int64)
    for shape, channel_first in [((0, 4), False), ((2, 4, 0, 3), True), ((0, 8, 5), True)]:
        z = torch.empty(shape)
        num_codebooks = shape[1 if channel_first else -1] // 4
        for mode in (0, 1, 2):
            codes, indices, usage = torch.ops.fsq.quantize_train(
                *_train_args(z, levels, channel_first, num_codebooks, mode, 0.5, key_offset, True))
            assert codes.shape == z.shape and indices.numel() == 0
            assert usage.shape == (num_codebooks, 1000) and int(usage.abs().sum()) == 0
            grad = torch.ops.fsq.quantize_backward(z, *_train_args(z, levels, channel_first, num_codebooks, mode, 0.5,
                                                                   key_offset, True)[:11])
            assert grad.shape == z.shape
    z = torch.randn(3, 1 << 14, 8) * 2
    g = torch.randn_like(z)
    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for mode in (1, 2):
                args = _train_args(z, levels, False, 2, mode, 0.3, key_offset, True)
                outs.append((*torch.ops.fsq.quantize_train(*args), torch.ops.fsq.quantize_backward(g, *args[:11])))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(outs[:2], outs[2:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_quantize_train_errors_name_the_argument():
    levels = (8, 5, 5, 5)
    z = torch.randn(4, 4)
    key_offset = torch.tensor([1, 2], dtype=torch.int64)

    def train(**change):
        args = dict(zip(["z", "levels", "variant", "hard_clamp", "channel_first", "num_codebooks", "table",
                         "key_offset", "dither_mode", "dither_p", "dither_steps", "return_usage"],
                        _train_args(z, levels, False, 1, 2, 0.5, key_offset, True)))
        args.update(change)
        return torch.ops.fsq.quantize_train(*args.values())

    with pytest.raises(ValueError, match=r"dither_mode must be 0 \(none\), 1 \(peer\) or 2 \(taae\), got 3"):
        train(dither_mode=3)
    with pytest.raises(ValueError, match=r"dither_p must be a float in \[0, 1\], got 1.5"):
        train(dither_p=1.5)
    with pytest.raises(ValueError, match="key_offset must be an int64 tensor of shape \\(2,\\).*got None"):
        train(key_offset=None)
    with pytest.raises(TypeError, match="key_offset must be an int64 tensor, got dtype Int"):
        train(key_offset=key_offset.int())
    with pytest.raises(ValueError, match=r"key_offset must have shape \(2,\), got \[3\]"):
        train(key_offset=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dither_steps must hold len\\(levels\\) = 4 values .* got 3"):
        train(dither_steps=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="dither_steps must be empty or hold len\\(levels\\) = 4 values, got 2"):
        train(dither_mode=1, dither_steps=[0.5, 0.5])
    with pytest.raises(ValueError, match="return_usage=True needs num_codebooks \\* prod\\(levels\\) <= 2\\^28"):
        big = (1 << 20, 1 << 10)
        torch.ops.fsq.quantize_train(torch.randn(3, 2), list(big), "symmetric", False, False, 1,
                                     _table(big, "symmetric", False), None, 0, 0.0, [], True)
    with pytest.raises(ValueError, match="fsq.quantize_backward: dither_mode must be"):
        torch.ops.fsq.quantize_backward(z, *_train_args(z, levels, False, 1, 2, 0.5, key_offset, True)[:7],
                                        key_offset, 5, 0.5, [])


@cuda_only
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["none", "peer", "taae"])
@pytest.mark.parametrize("case", CUDA_CASES[:5], ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
def test_cuda_quantize_train_matches_cpu(case, mode):
    """The CUDA forward draws the CPU forward's noise bit for bit (peer; taae up to the tanh of its
    unquantized branches); indices and usage are identical; the dithered backward agrees to float32
    rounding. The usage histogram takes the shared-memory path (up to 8192 bins: [8,5,5,5] x 2,
    (300, 7) x 2) and the global one ((8,8,8,6,5,5,5,5): 1920000 bins)."""
    levels, num_codebooks, layout, dtype = case
    z, channel_first = make_z(layout, 1003, len(levels) * num_codebooks, dtype, seed=6, scale=2.0)
    inject_specials(z, levels, "symmetric", False, channel_first)
    key_offset = torch.tensor([0x1234_5678_9ABC, -5], dtype=torch.int64)
    args = _train_args(z, levels, channel_first, num_codebooks, mode, 0.4, key_offset, True)
    args_c = (on_device(z, "cuda"), *args[1:7], args[7].cuda() if mode else None, *args[8:])
    codes, indices, usage = torch.ops.fsq.quantize_train(*args)
    codes_c, indices_c, usage_c = torch.ops.fsq.quantize_train(*args_c)
    assert torch.equal(indices_c.cpu(), indices) and torch.equal(usage_c.cpu(), usage)
    if mode == 2:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(codes_c.cpu(), codes, rtol=4 * eps, atol=4 * eps, equal_nan=True)
    else:
        assert torch.equal(codes_c.cpu().nan_to_num(9.0), codes.nan_to_num(9.0))
    g = torch.randn(z.shape).to(dtype)
    gz = torch.ops.fsq.quantize_backward(g, *args[:11])
    gz_c = torch.ops.fsq.quantize_backward(g.cuda(), *args_c[:11])
    torch.testing.assert_close(gz_c.cpu(), gz, equal_nan=True, rtol=1e-5 if dtype == torch.float32 else None,
                               atol=1e-7 if dtype == torch.float32 else None)
    assert torch.equal(gz_c.cpu() == 0, gz == 0)


@pytest.mark.parametrize("case", [(torch.float32, "cl3d", 2, 1), (torch.bfloat16, "cf4d", 1, 2),
                                  (torch.float64, "cl_strided", 1, 0)], ids=lambda c: f"{c[0]}-{c[1]}-mode{c[3]}")
def test_quantize_train_opcheck(case):
    """Fake implementation, autograd registration and schema of the fused training ops agree with
    the CPU kernels (torch.library.opcheck)."""
    dtype, layout, num_codebooks, mode = case
    levels = (8, 5, 5, 5)
    z, channel_first = make_z(layout, 5, len(levels) * num_codebooks, dtype, seed=2)
    z.requires_grad_(True)
    args = _train_args(z, levels, channel_first, num_codebooks, mode, 0.5, torch.tensor([3, 4]), True)
    torch.library.opcheck(torch.ops.fsq.quantize_train.default, args)
    g = torch.randn(z.shape).to(dtype)
    torch.library.opcheck(torch.ops.fsq.quantize_backward.default, (g, z.detach(), *args[1:11]))
