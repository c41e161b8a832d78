"""The fused Triton residual FSQ (fsq_kernels/triton/residual.py) against reference.residual_quantize.

Correctness is the shared per-stage rule of tests/conftest.py: every stage index is the float64
rounding of its stage input given the kernel's own earlier choices (`assert_residual_consistent`),
and the kernel agrees with the reference up to the first differing stage, which must lie inside
its amplified window (`assert_residual_parity`).  On top of that: the quantized sum is the sum of
the decoded stages (and bit-equal to the reference's float32 sum where every stage agrees and no
soft clamp is involved: same float32 operations in the same order), and the one-pass backward
matches grad_out * softclamp'(x) * sum_s bound'(y_s) in float64.

CPU: kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest), so sizes are
tiny.  GPU: FSQ_TEST_DEVICE=cuda runs the same file on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

from .conftest import (
    GRAD_TOLERANCE,
    TEST_DEVICE,
    assert_residual_consistent,
    assert_residual_parity,
    residual_stage_inputs,
    residual_windows,
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
from fsq_kernels.triton import residual as R  # noqa: E402

# tanh from exp2 overflows to inf for large |x| on purpose (2 / (inf + 1) = 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

DEV = torch.device(TEST_DEVICE)
LEVELS = (8, 5, 5, 5)
PEER_SOFT = tuple(reference.residual_soft_clamp(LEVELS))
# (hard_clamp, soft clamp): the peer's default pairing, no soft clamp, tanh stages (with and
# without a soft clamp)
BOUNDS = [(True, PEER_SOFT), (True, None), (False, None), (False, (1.5, 1.5, 1.5, 1.5))]


def _x(shape, dtype, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _layout(name, dtype, seed):
    """(x, channel_first) for d = 4 channels; views are made on DEV, never copied."""
    if name == "cl2d":
        return _x((13, 4), dtype, seed), False
    if name == "cl3d":
        return _x((2, 5, 4), dtype, seed), False
    if name == "cl_sliced":  # token stride 9, channel stride 1
        return _x((7, 9), dtype, seed)[:, 2:6], False
    if name == "cl_transposed":  # channel stride = tokens, token stride 1
        return _x((4, 6), dtype, seed).t(), False
    if name == "cf4d":
        return _x((2, 4, 3, 5), dtype, seed), True
    if name == "cf4d_channels_last":  # NHWC memory, NCHW logical
        return _x((2, 3, 5, 4), dtype, seed).permute(0, 3, 1, 2), True
    if name == "cf5d_strided":
        return _x((2, 4, 4, 2, 6), dtype, seed)[:, :, ::2, :, ::2], True
    if name == "cl6d_strided":  # 5 non-collapsible token dims: the documented copy fallback
        return _x((3, 3, 3, 3, 3, 4), dtype, seed)[::2, ::2, ::2, ::2, ::2], False
    raise ValueError(name)


def _rq(x, levels, q, hc, soft, cf, active):
    active = None if active is None else torch.tensor(active, device=x.device)  # quantize dropout: a tensor
    return triton_backend.residual_quantize(x, tuple(levels), q, hc, soft, cf, active)


def _cst(levels, q, hc, soft):
    """The constexpr payload the op layer hands the launchers."""
    table = tables.residual_table(tuple(levels), q, hc, torch.float32)
    return triton_backend.payload(tuple(levels), "symmetric", hc, tuple(table), soft, q)


def _tokens_last(t, cf):
    return t.movedim(1, -1) if cf else t


def _expected_grad(x, g, levels, q, hc, soft, cf, idx):
    """float64 grad_out * softclamp'(x) * sum over active stages of bound'(y_s), with y_s from
    the kernel's own stage choices; plus a per-element allowance for what float32 noise
    (amplified by L^s at stage s, conftest.residual_windows) can flip or move."""
    h = _tokens_last(x.detach().cpu().to(torch.float64), cf)
    gg = _tokens_last(g.detach().cpu().to(torch.float64), cf)
    dh = torch.ones_like(h)
    if soft is not None:
        c = torch.tensor(soft, dtype=torch.float64)
        dh = 1 - torch.tanh(h / c) ** 2
    y = residual_stage_inputs(x, levels, idx, soft_clamp=soft, channel_first=cf)  # (..., q, d)
    active = ~torch.isnan(y)
    yy = y.nan_to_num(0.0)
    d = ((yy > -1) & (yy < 1)).to(torch.float64) if hc else 1 - torch.tanh(yy) ** 2
    count = torch.where(active, d, 0.0).sum(-2)
    want = gg * dh * count
    windows = residual_windows(levels, q, hc)  # (q, d)
    if hc:  # the indicator itself is uncertain next to the clamp edge
        uncertain = (((yy.abs() - 1).abs() < windows) & active).any(-2)
        slack = torch.zeros_like(want)
    else:  # 1 - tanh^2 moves by at most 0.77 |dy|; float32 noise at stage s ~ 1e-6 L^s
        uncertain = torch.zeros_like(want, dtype=torch.bool)
        levels_t = torch.tensor(levels, dtype=torch.float64)
        noise = torch.stack([1e-6 * levels_t**s for s in range(q)]).clamp_max(1.0)
        slack = (gg * dh).abs() * (torch.where(active, noise, 0.0)).sum(-2)
    return want, uncertain, slack


def _check(x, levels=LEVELS, q=4, hc=True, soft=PEER_SOFT, cf=False, active=None, check_grad=True):
    active = q if active is None else active
    levels = tuple(levels)
    xx = x.detach().clone().requires_grad_(True)
    out, idx = _rq(xx, levels, q, hc, soft, cf, active)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert idx.dtype == reference.index_dtype(levels) and idx.device == x.device
    tok = (x.shape[0],) + tuple(x.shape[2:]) if cf else tuple(x.shape[:-1])
    assert idx.shape == ((tok[0], q) + tok[1:] if cf else tok + (q,))
    stage_axis = 1 if cf else -1
    assert (idx.narrow(stage_axis, active, q - active) == -1).all()
    nan_token = torch.isnan(_tokens_last(x.detach(), cf)).any(-1)
    idx_last = _tokens_last(idx, cf)
    assert (idx_last[..., :active][~nan_token] >= 0).all() and (idx_last[nan_token] == -1).all()

    assert_residual_consistent(idx, x, levels, soft_clamp=soft, hard_clamp=hc, channel_first=cf)
    ref_out, ref_idx = reference.residual_quantize(x.detach().cpu(), levels, q, hard_clamp=hc, soft_clamp=soft,
                                                   channel_first=cf, active_stages=active)
    assert_residual_parity(idx, ref_idx, x, levels, soft_clamp=soft, hard_clamp=hc, channel_first=cf)

    # the quantized sum is the sum of the decoded stages (float64 from the kernel's own indices)
    idx64 = idx_last.cpu().to(torch.int64)
    scales = torch.tensor(reference.residual_scales(levels, q), dtype=torch.float64)
    codes = reference.indices_to_codes(idx64.clamp_min(0), levels, variant="symmetric", dtype=torch.float64)
    want = torch.where((idx64 >= 0).unsqueeze(-1), codes * scales, 0.0).sum(-2)
    got = _tokens_last(out.detach().cpu(), cf)
    finite = ~nan_token
    if x.dtype == torch.float32:
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got[finite], want[finite].to(x.dtype))
    # where every stage agrees with the reference: the same float32 operations in the same order
    same = (_tokens_last(ref_idx, cf) == idx64).all(-1) & finite
    ref_last = _tokens_last(ref_out, cf)
    if soft is None:
        assert torch.equal(got[same], ref_last[same])
    else:  # our tanh (exp2) is not torch.tanh: a few 1e-8 absolute
        torch.testing.assert_close(got[same].double(), ref_last[same].double(), rtol=1e-6, atol=2e-7)

    if check_grad:
        g = _x(x.shape, x.dtype, seed=99)
        (gx,) = torch.autograd.grad(out, xx, g)
        assert gx.dtype == x.dtype and gx.shape == x.shape
        want_g, uncertain, slack = _expected_grad(x, g, levels, q, hc, soft, cf, idx)
        got_g = _tokens_last(gx.cpu(), cf)
        ok = ~uncertain & finite.unsqueeze(-1).expand_as(uncertain)
        if x.dtype == torch.float32:
            tol = GRAD_TOLERANCE[torch.float32]
            err = (got_g.double() - want_g).abs()
            bound = tol["atol"] + tol["rtol"] * want_g.abs() + slack
            assert (err[ok] <= bound[ok]).all(), f"max excess {(err - bound)[ok].max().item()}"
        else:
            tol = dict(GRAD_TOLERANCE[x.dtype])
            tol["atol"] = tol["atol"] + float(slack.max()) if slack.numel() else tol["atol"]
            torch.testing.assert_close(got_g[ok], want_g[ok].to(x.dtype), **tol)
        if active <= 4 and hc and max(levels) <= 8:  # (L^s windows of L = 300 cover everything)
            assert uncertain.float().mean() < 0.05
    return out, idx


# ---------------------------------------------------------------------------------------------
# Bounds x stage counts x dtypes, layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("q,active", [(4, 4), (8, 8), (6, 3), (3, 0)])
@pytest.mark.parametrize("hc,soft", BOUNDS, ids=["peer", "hard", "tanh", "tanh_soft"])
def test_bounds_stages_dtypes(hc, soft, q, active, dtype):
    x = _x((3, 11, 4), dtype, seed=q * 10 + active)
    _check(x, LEVELS, q, hc, soft, False, active)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["cl2d", "cl3d", "cl_sliced", "cl_transposed", "cf4d", "cf4d_channels_last",
                                    "cf5d_strided", "cl6d_strided"])
def test_layouts(layout, dtype):
    x, cf = _layout(layout, dtype, seed=len(layout))
    assert layout in ("cl2d", "cl3d", "cf4d") or not x.is_contiguous()
    hc, soft = BOUNDS[len(layout) % len(BOUNDS)]
    out, _ = _check(x, LEVELS, 5, hc, soft, cf, active=4)
    if layout == "cf4d_channels_last":
        assert out.stride() == x.stride()  # memory format preserved


@pytest.mark.parametrize("levels", [(5, 5, 5), (7, 5, 5, 5, 5), (2, 3, 4), (300, 7)], ids=str)
def test_level_sets(levels):
    """Other widths (D_PAD padding lanes), L = 2, and L > fsq.CMP_MAX_LEVELS (the clamp/tanh
    path of the level index instead of boundary comparisons)."""
    soft = tuple(reference.residual_soft_clamp(levels))
    for hc in (True, False):
        x = _x((9, len(levels)), torch.float32, seed=len(levels) + hc)
        _check(x, levels, 3, hc, soft if hc else None, False)


def test_sizes_one_and_many():
    _check(_x((1, 4), torch.float32, seed=1), q=8)
    _check(_x((1, 4, 1003), torch.bfloat16, seed=2), q=4, cf=True, active=2)
    _check(_x((1003, 4), torch.float32, seed=3), q=6, hc=False, soft=None, active=5, check_grad=False)


# ---------------------------------------------------------------------------------------------
# Special values, index dtype, 64-bit offsets, empty input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hc,soft", BOUNDS, ids=["peer", "hard", "tanh", "tanh_soft"])
def test_nan_inf(hc, soft):
    x = _x((6, 4), torch.float32, seed=7)
    x[0, 1] = float("nan")  # token 0: index -1 at every stage, NaN only in channel 1
    x[1] = float("nan")
    x[2, :] = float("inf")  # saturates at the top level of every stage
    x[3, :] = float("-inf")
    x[4, 2] = float("inf")
    out, idx = _check(x, LEVELS, 4, hc, soft, check_grad=False)
    o, i = out.cpu(), idx.cpu()
    assert (i[:2] == -1).all() and (i[2:] >= 0).all()
    assert torch.isnan(o[0, 1]) and not torch.isnan(o[0, [0, 2, 3]]).any() and torch.isnan(o[1]).all()
    assert not torch.isnan(o[2:]).any()
    assert (i[2] == 8 * 5 * 5 * 5 - 1).all() and (i[3] == 0).all()
    ref_out, ref_idx = reference.residual_quantize(x.cpu(), LEVELS, 4, hard_clamp=hc, soft_clamp=soft)
    assert torch.equal(i[:4], ref_idx[:4])
    torch.testing.assert_close(o[:4], ref_out[:4], equal_nan=True, rtol=1e-6, atol=1e-6)
    # gradient NaN pattern and values as autograd of the reference gives them
    xx, xr = x.clone().requires_grad_(True), x.cpu().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_rq(xx, LEVELS, 4, hc, soft, False, 4)[0].sum(), xx)
    out_r, _ = reference.residual_quantize(xr, LEVELS, 4, hard_clamp=hc, soft_clamp=soft)
    (gr,) = torch.autograd.grad(out_r.sum(), xr)
    torch.testing.assert_close(gx.cpu()[:5], gr[:5], equal_nan=True, rtol=1e-4, atol=1e-6)
    # no active stage: zeros, no NaN, no gradient through x
    out0, idx0 = _rq(xx, LEVELS, 4, hc, soft, False, 0)
    assert (idx0 == -1).all() and torch.equal(out0.detach().cpu(), torch.zeros(6, 4))
    (g0,) = torch.autograd.grad(out0.sum(), xx)
    assert torch.equal(g0.cpu(), torch.zeros(6, 4))


def test_int64_indices():
    levels = (300, 300, 300, 300)  # 8.1e9 codes > 2^31 - 1
    x = _x((7, 4), torch.float32, seed=5)
    _, idx = _check(x, levels, 2, True, None, check_grad=False)
    assert idx.dtype == torch.int64 and int(idx.max()) > 2**31


@pytest.mark.parametrize("layout", ["cl_sliced", "cf5d_strided"])
def test_int64_offset_path(layout, monkeypatch):
    """The 64-bit offset path (tensors past 2^31 elements) forced on a small tensor."""
    monkeypatch.setattr(triton_common, "_FORCE_I64", True)
    x, cf = _layout(layout, torch.float32, seed=1)
    _check(x, LEVELS, 4, True, PEER_SOFT, cf)
    cst = _cst(LEVELS, 4, True, PEER_SOFT)
    assert _captured(R.residual_forward, x, cst, True, cf, None)[2]["I64"]
    assert _captured(R.residual_backward, x, x, cst, True, cf, None)[2]["I64"]


@pytest.mark.parametrize("shape,cf", [((0, 4), False), ((3, 0, 4), False), ((0, 4, 2, 2), True), ((2, 4, 0, 3), True)])
def test_empty_no_launch(shape, cf):
    def no_launch(kernel):
        raise AssertionError("a kernel was launched for an empty tensor")

    x = torch.empty(shape, device=DEV)
    cst = _cst(LEVELS, 3, True, PEER_SOFT)
    out, idx = R.residual_forward(x, cst, True, cf, None, wrap=no_launch)
    tok = (shape[0],) + shape[2:] if cf else shape[:-1]
    assert out.shape == x.shape and idx.dtype == torch.int32
    assert idx.shape == ((tok[0], 3) + tok[1:] if cf else tok + (3,))
    assert R.residual_backward(x, x, cst, True, cf, None, wrap=no_launch).shape == x.shape
    o2, i2 = fsq_kernels.residual_quantize(x, LEVELS, 3, channel_first=cf, backend="triton")
    assert o2.shape == x.shape and i2.shape == idx.shape


# ---------------------------------------------------------------------------------------------
# Registration, autograd, compile keys, public API
# ---------------------------------------------------------------------------------------------


def test_opcheck():
    x = _x((2, 4, 2, 3), torch.float32, seed=2).requires_grad_(True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEV.type == "cuda":
        tests = tests + ("test_aot_dispatch_dynamic",)  # tracing runs the kernels: not in the interpreter
    for soft, active in ((list(PEER_SOFT), torch.tensor(3, device=DEV)), (None, None)):
        table = tables.residual_table(LEVELS, 4, True, torch.float32)
        torch.library.opcheck(torch.ops.fsq_triton.residual_quantize.default,
                              (x, list(LEVELS), 4, True, soft, True, active, table), test_utils=tests)
        table = tables.residual_table(LEVELS, 4, False, torch.float32)
        torch.library.opcheck(torch.ops.fsq_triton.residual_quantize_backward.default,
                              (torch.randn_like(x), x.detach(), list(LEVELS), 4, False, soft, True, active, table),
                              test_utils=tests)


def test_saves_only_x():
    x = _x((5, 4), torch.bfloat16, seed=4).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _rq(x, LEVELS, 8, True, PEER_SOFT, False, 8)
    # x, and the 0-d active_stages tensor of quantize dropout
    assert len(saved) == 2 and saved[0].dtype == torch.bfloat16 and saved[0].shape == x.shape
    assert saved[1].dim() == 0 and not saved[1].is_floating_point()


def _captured(launcher, *args):
    calls = []

    def wrap(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *a, **kw: calls.append((kernel, a, kw))

        return _Grid()

    launcher(*args, wrap=wrap)
    (call,) = calls
    return call


def test_active_stages_is_a_runtime_argument():
    """Quantize dropout changes active_stages every step: the kernels load it from a 0-d tensor
    (no host sync), so it is no part of the compile key and every value reuses one kernel."""
    x = torch.empty(64, 4, device="meta")
    cst = _cst(LEVELS, 8, True, PEER_SOFT)
    for launcher, lead in ((R.residual_forward, (x,)), (R.residual_backward, (x, x))):
        keys = set()
        for active in range(0, 9):
            a = torch.tensor(active, device="meta")
            kernel, args, kwargs = _captured(launcher, *lead, cst, True, False, a)
            assert args[3] is a and kwargs["HAS_ACTIVE"] and "active_stages" not in kwargs
            keys.add(repr(sorted(kwargs.items())))
        assert len(keys) == 1
        _, _, kwargs = _captured(launcher, *lead, cst, True, False, None)
        assert not kwargs["HAS_ACTIVE"]  # None: every stage, no load


def test_public_api_backend_triton():
    assert "triton" in fsq_kernels.available_backends("residual_quantize")
    x = _x((2, 4, 3, 3), torch.float32, seed=9).requires_grad_(True)
    out, idx = fsq_kernels.residual_quantize(x, LEVELS, 4, soft_clamp=PEER_SOFT, channel_first=True,
                                             active_stages=3, backend="triton")
    out2, idx2 = _rq(x, LEVELS, 4, True, PEER_SOFT, True, 3)
    assert torch.equal(out, out2) and torch.equal(idx, idx2)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------
# GPU only: torch.compile and no host-device sync (the interpreter cannot be traced)
# ---------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(DEV.type != "cuda", reason="needs CUDA tensors (FSQ_TEST_DEVICE=cuda)")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_fullgraph(dtype):
    def f(x, active):
        out, idx = _rq(x, LEVELS, 8, True, PEER_SOFT, True, active)
        return out * 2, idx

    x = _x((2, 4, 16, 16), dtype, seed=12).requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True)
    for active in (8, 3):  # quantize dropout: a new active_stages value
        o1, i1 = compiled(x, active)
        o0, i0 = f(x, active)
        assert torch.equal(o1, o0) and torch.equal(i1, i0)
        (g1,) = torch.autograd.grad(o1.sum(), x)
        (g0,) = torch.autograd.grad(o0.sum(), x)
        assert torch.equal(g1, g0)


@cuda_only
def test_no_host_sync():
    x = _x((4, 4, 16, 16), torch.bfloat16, seed=13).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, idx = _rq(x, LEVELS, 8, True, PEER_SOFT, True, 5)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
