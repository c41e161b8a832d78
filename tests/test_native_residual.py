"""The fused residual FSQ of the C++ extension (fsq::residual_quantize, csrc/) against
reference.residual_quantize.

Correctness is the shared per-stage rule of tests/conftest.py: every stage index is the float64
rounding of its stage input given the kernel's own earlier choices (`assert_residual_consistent`),
and the kernel agrees with the reference up to the first differing stage, which must lie inside
its amplified window (`assert_residual_parity`). On top of that: the quantized sum is the sum of
the decoded stages, and bit-equal to the reference's sum where every stage agrees and no soft
clamp is involved (same float32 operations in the same order); the one-pass backward matches
grad_out * softclamp'(x) * sum_s bound'(y_s) in float64.

CPU kernels run here for real; the CUDA kernels are compared with them where a GPU is visible.
"""

from __future__ import annotations

import pytest
import torch

import fsq_kernels
from fsq_kernels import reference
from fsq_kernels.ops import native, tables

from .conftest import (
    GRAD_TOLERANCE,
    assert_residual_consistent,
    assert_residual_parity,
    on_device,
    residual_stage_inputs,
    residual_windows,
)

pytestmark = pytest.mark.skipif(not native.is_available("cpu"), reason="fsq_kernels._C is not built")

LEVELS = (8, 5, 5, 5)
PEER_SOFT = tuple(reference.residual_soft_clamp(LEVELS))
# (hard_clamp, soft clamp): the peer's default pairing, no soft clamp, tanh stages (with and
# without a soft clamp)
BOUNDS = [(True, PEER_SOFT), (True, None), (False, None), (False, (1.5, 1.5, 1.5, 1.5))]
BOUND_IDS = ["peer", "hard", "tanh", "tanh_soft"]


def _x(shape, dtype, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _layout(name, n, dtype, seed):
    """(x, channel_first) with about n tokens and d = 4 channels; views, never copies."""
    if name == "cl2d":
        return _x((n, 4), dtype, seed), False
    if name == "cl3d":
        return _x((2, n, 4), dtype, seed), False
    if name == "cl_sliced":  # token stride 9, channel stride 1
        return _x((n, 9), dtype, seed)[:, 2:6], False
    if name == "cl_transposed":  # channel stride = tokens, token stride 1
        return _x((4, n), dtype, seed).t(), False
    if name == "cf4d":
        return _x((2, 4, n, 3), dtype, seed), True
    if name == "cf4d_channels_last":  # NHWC memory, NCHW logical
        return _x((2, 3, n, 4), dtype, seed).permute(0, 3, 1, 2), True
    if name == "cf5d_strided":
        return _x((2, 4, 4, n, 6), dtype, seed)[:, :, ::2, :, ::2], True
    raise ValueError(name)


def _tokens_last(t, cf):
    return t.movedim(1, -1) if cf else t


def _rq(x, levels, q, hc, soft, cf, active):
    active = None if active is None else torch.tensor(active, device=x.device)  # quantize dropout: a tensor
    return native.residual_quantize(x, tuple(levels), q, hc, soft, cf, active)


def _expected_grad(x, g, levels, q, hc, soft, cf, idx):
    """float64 grad_out * softclamp'(x) * sum over active stages of bound'(y_s), y_s from the
    kernel's own stage choices; plus what float32 noise (amplified by L^s at stage s) can flip
    (hard clamp: `uncertain`) or move (tanh: `slack`)."""
    h = _tokens_last(x.detach().to(torch.float64), cf)
    gg = _tokens_last(g.detach().to(torch.float64), cf)
    dh = torch.ones_like(h)
    if soft is not None:
        c = torch.tensor(soft, dtype=torch.float64)
        dh = 1 - torch.tanh(h / c) ** 2
    y = residual_stage_inputs(x, levels, idx, soft_clamp=soft, channel_first=cf)  # (..., q, d)
    active = ~torch.isnan(y)
    yy = y.nan_to_num(0.0)
    d = ((yy > -1) & (yy < 1)).to(torch.float64) if hc else 1 - torch.tanh(yy) ** 2
    want = gg * dh * torch.where(active, d, 0.0).sum(-2)
    windows = residual_windows(levels, q, hc)
    if hc:
        uncertain = (((yy.abs() - 1).abs() < windows) & active).any(-2)
        slack = torch.zeros_like(want)
    else:
        uncertain = torch.zeros_like(want, dtype=torch.bool)
        levels_t = torch.tensor(levels, dtype=torch.float64)
        noise = torch.stack([1e-6 * levels_t**s for s in range(q)]).clamp_max(1.0)
        slack = (gg * dh).abs() * torch.where(active, noise, 0.0).sum(-2)
    return want, uncertain, slack


def _assert_grad(gx, x, g, levels, q, hc, soft, cf, idx):
    """gx against the float64 formula with the stage choices in idx (dropped stages: -1)."""
    assert gx.dtype == x.dtype and gx.shape == x.shape
    finite = ~torch.isnan(_tokens_last(x.detach().cpu(), cf)).any(-1)
    want_g, uncertain, slack = _expected_grad(x.detach().cpu(), g.cpu(), levels, q, hc, soft, cf, idx.cpu())
    got_g = _tokens_last(gx.detach().cpu(), cf)
    ok = ~uncertain & finite.unsqueeze(-1).expand_as(uncertain)
    if x.dtype in (torch.float32, torch.float64):
        tol = GRAD_TOLERANCE[torch.float32]
        err = (got_g.double() - want_g).abs()
        bound = tol["atol"] + tol["rtol"] * want_g.abs() + slack
        assert (err[ok] <= bound[ok]).all(), f"max excess {(err - bound)[ok].max().item()}"
    else:
        tol = dict(GRAD_TOLERANCE[x.dtype])
        tol["atol"] = tol["atol"] + (float(slack[ok].max()) if ok.any() else 0.0)
        torch.testing.assert_close(got_g[ok], want_g[ok].to(x.dtype), **tol)
    if hc and max(levels) <= 8 and uncertain.numel() >= 64 and (idx >= 0).sum(1 if cf else -1).max() <= 4:
        assert uncertain.float().mean() < 0.05


def _check(x, levels=LEVELS, q=4, hc=True, soft=PEER_SOFT, cf=False, active=None, check_grad=True):
    active = q if active is None else active
    levels = tuple(levels)
    xx = x.detach().clone().requires_grad_(True)
    out, idx = _rq(xx, levels, q, hc, soft, cf, active)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == torch.empty_like(x).stride()
    assert idx.dtype == reference.index_dtype(levels) and idx.is_contiguous()
    tok = (x.shape[0],) + tuple(x.shape[2:]) if cf else tuple(x.shape[:-1])
    assert idx.shape == ((tok[0], q) + tok[1:] if cf else tok + (q,))
    stage_axis = 1 if cf else -1
    assert (idx.narrow(stage_axis, active, q - active) == -1).all()
    nan_token = torch.isnan(_tokens_last(x.detach(), cf)).any(-1)
    idx_last = _tokens_last(idx, cf)
    assert (idx_last[..., :active][~nan_token] >= 0).all() and (idx_last[nan_token] == -1).all()

    assert_residual_consistent(idx, x, levels, soft_clamp=soft, hard_clamp=hc, channel_first=cf)
    ref_out, ref_idx = reference.residual_quantize(x.detach(), levels, q, hard_clamp=hc, soft_clamp=soft,
                                                   channel_first=cf, active_stages=active)
    assert_residual_parity(idx, ref_idx, x, levels, soft_clamp=soft, hard_clamp=hc, channel_first=cf)

    # the quantized sum is the sum of the decoded stages (float64 from the kernel's own indices)
    idx64 = idx_last.to(torch.int64)
    scales = torch.tensor(reference.residual_scales(levels, q), dtype=torch.float64)
    codes = reference.indices_to_codes(idx64.clamp_min(0), levels, variant="symmetric", dtype=torch.float64)
    want = torch.where((idx64 >= 0).unsqueeze(-1), codes * scales, 0.0).sum(-2)
    got = _tokens_last(out.detach(), cf)
    finite = ~nan_token
    if x.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got[finite], want[finite].to(x.dtype))
    # where every stage agrees with the reference: the same float operations in the same order
    same = (_tokens_last(ref_idx, cf) == idx64).all(-1) & finite
    ref_last = _tokens_last(ref_out, cf)
    if soft is None or x.dtype == torch.float64:  # float64 uses the libm tanh, as torch does
        assert torch.equal(got[same], ref_last[same])
    else:  # our float32 tanh is not torch.tanh: a few 1e-8 absolute
        torch.testing.assert_close(got[same].double(), ref_last[same].double(), rtol=1e-6, atol=2e-7)

    if check_grad:
        g = _x(x.shape, x.dtype, seed=99)
        (gx,) = torch.autograd.grad(out, xx, g)
        _assert_grad(gx, x, g, levels, q, hc, soft, cf, idx)
    return out, idx


# ---------------------------------------------------------------------------------------------
# Bounds x stage counts x dtypes, layouts x sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("q,active", [(4, 4), (8, 8), (6, 3), (3, 0)])
@pytest.mark.parametrize("hc,soft", BOUNDS, ids=BOUND_IDS)
def test_bounds_stages_dtypes(hc, soft, q, active, dtype):
    x = _x((3, 37, 4), dtype, seed=q * 10 + active)
    _check(x, LEVELS, q, hc, soft, False, active)


@pytest.mark.parametrize("n", [1, 7, 1003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["cl2d", "cl3d", "cl_sliced", "cl_transposed", "cf4d", "cf4d_channels_last",
                                    "cf5d_strided"])
def test_layouts_and_sizes(layout, dtype, n):
    x, cf = _layout(layout, n, dtype, seed=len(layout) + n)
    hc, soft = BOUNDS[(len(layout) + n) % len(BOUNDS)]
    out, _ = _check(x, LEVELS, 5, hc, soft, cf, active=4, check_grad=n < 1003 or layout == "cf4d")
    if layout == "cf4d_channels_last":
        assert out.stride() == x.stride()  # memory format preserved


@pytest.mark.parametrize("levels", [(5, 5, 5), (7, 5, 5, 5, 5), (2, 3, 4), (300, 7), (8,) * 16], ids=str)
def test_level_sets(levels):
    """Other widths, L = 2, L = 300 (binary search over 299 boundaries), 16 channels."""
    soft = tuple(reference.residual_soft_clamp(levels))
    for hc in (True, False):
        x = _x((301, len(levels)), torch.float32, seed=len(levels) + hc)
        _check(x, levels, 3, hc, soft if hc else None, False)


def test_int64_indices():
    levels = (300, 300, 300, 300)  # 8.1e9 codes > 2^31 - 1
    x = _x((57, 4), torch.float32, seed=5)
    _, idx = _check(x, levels, 2, True, None, check_grad=False)
    assert idx.dtype == torch.int64 and int(idx.max()) > 2**31


# ---------------------------------------------------------------------------------------------
# Special values, empty input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hc,soft", BOUNDS, ids=BOUND_IDS)
def test_nan_inf(hc, soft, dtype):
    x = _x((6, 4), dtype, seed=7)
    x[0, 1] = float("nan")  # token 0: index -1 at every stage, NaN only in channel 1
    x[1] = float("nan")
    x[2, :] = float("inf")  # saturates at the top level of every stage
    x[3, :] = float("-inf")
    x[4, 2] = float("inf")
    out, idx = _check(x, LEVELS, 4, hc, soft, check_grad=False)
    assert (idx[:2] == -1).all() and (idx[2:] >= 0).all()
    assert torch.isnan(out[0, 1]) and not torch.isnan(out[0, [0, 2, 3]]).any() and torch.isnan(out[1]).all()
    assert not torch.isnan(out[2:]).any()
    assert (idx[2] == 8 * 5 * 5 * 5 - 1).all() and (idx[3] == 0).all()
    ref_out, ref_idx = reference.residual_quantize(x, LEVELS, 4, hard_clamp=hc, soft_clamp=soft)
    assert torch.equal(idx[:4], ref_idx[:4])
    torch.testing.assert_close(out[:4], ref_out[:4], equal_nan=True, rtol=1e-6, atol=1e-6)
    # gradient NaN pattern and values as autograd of the reference gives them
    xx, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_rq(xx, LEVELS, 4, hc, soft, False, 4)[0].sum(), xx)
    (gr,) = torch.autograd.grad(reference.residual_quantize(xr, LEVELS, 4, hard_clamp=hc, soft_clamp=soft)[0].sum(), xr)
    torch.testing.assert_close(gx[:5], gr[:5], equal_nan=True, rtol=1e-4, atol=1e-6)
    # no active stage: zeros, no NaN, no gradient through x
    out0, idx0 = _rq(xx, LEVELS, 4, hc, soft, False, 0)
    assert (idx0 == -1).all() and torch.equal(out0.detach(), torch.zeros(6, 4, dtype=dtype))
    (g0,) = torch.autograd.grad(out0.sum(), xx)
    assert torch.equal(g0, torch.zeros(6, 4, dtype=dtype))


@pytest.mark.parametrize("shape,cf", [((0, 4), False), ((3, 0, 4), False), ((0, 4, 2, 2), True), ((2, 4, 0, 3), True)])
def test_empty(shape, cf):
    x = torch.empty(shape, requires_grad=True)
    out, idx = _rq(x, LEVELS, 3, True, PEER_SOFT, cf, 3)
    tok = (shape[0],) + shape[2:] if cf else shape[:-1]
    assert out.shape == x.shape and idx.dtype == torch.int32
    assert idx.shape == ((tok[0], 3) + tok[1:] if cf else tok + (3,))
    out.sum().backward()
    assert x.grad.shape == x.shape
    o2, i2 = fsq_kernels.residual_quantize(x.detach(), LEVELS, 3, channel_first=cf, backend="cpp")
    assert o2.shape == x.shape and i2.shape == idx.shape


# ---------------------------------------------------------------------------------------------
# Determinism, registration, autograd, errors, public API
# ---------------------------------------------------------------------------------------------


def test_bitwise_deterministic_across_threads():
    x = torch.randn(1 << 15, 4) * 2
    xc = torch.randn(2, 4, 64, 129) * 2
    g, gc = torch.randn_like(x), torch.randn_like(xc)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            row = []
            for hc, soft in BOUNDS:
                for xi, gi, cf in ((x, g, False), (xc, gc, True)):
                    o, i = _rq(xi, LEVELS, 8, hc, soft, cf, 8)
                    gx = torch.ops.fsq.residual_quantize_backward(
                        gi, xi, list(LEVELS), 8, hc, None if soft is None else list(soft), cf, torch.tensor(6),
                        tables.residual_table(LEVELS, 8, hc, xi.dtype))
                    row += [o, i, gx]
            outs.append(row)
    finally:
        torch.set_num_threads(prev)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


OPCHECK_CASES = [
    (torch.float32, "cl2d", True, PEER_SOFT, 4, 4),
    (torch.bfloat16, "cf4d", False, None, 5, 3),
    (torch.float64, "cl_sliced", True, None, 3, 0),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_opcheck(case):
    dtype, layout, hc, soft, q, active = case
    x, cf = _layout(layout, 9, dtype, seed=1)
    x.requires_grad_(True)
    soft_list = None if soft is None else list(soft)
    table = tables.residual_table(LEVELS, q, hc, dtype)
    for act in (torch.tensor(active), None):
        torch.library.opcheck(torch.ops.fsq.residual_quantize.default, (x, list(LEVELS), q, hc, soft_list, cf, act, table))
        g = torch.randn(x.shape).to(dtype)
        torch.library.opcheck(torch.ops.fsq.residual_quantize_backward.default,
                              (g, x.detach(), list(LEVELS), q, hc, soft_list, cf, act, table))


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


def test_aten_ops_independent_of_stage_count():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = {}
    for q in (2, 4, 8):
        x = torch.randn(64, 4, requires_grad=True)
        with Count() as c:
            out, _ = _rq(x, LEVELS, q, True, PEER_SOFT, False, q)
            out.backward(torch.ones_like(out))
        counts[q] = c.ops
    assert counts[2] == counts[4] == counts[8]
    assert sum("fsq.residual_quantize" in op for op in counts[8]) == 2  # forward + backward


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    def f(x, active):
        out, idx = _rq(x, LEVELS, 8, True, PEER_SOFT, True, active)
        return (out * 2).sum(), idx

    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    for active in (8, 3):
        loss, idx = compiled(x, active)
        (grad,) = torch.autograd.grad(loss, x)
        loss_ref, idx_ref = f(x, active)
        (grad_ref,) = torch.autograd.grad(loss_ref, x)
        assert torch.equal(idx, idx_ref)
        torch.testing.assert_close(loss, loss_ref)
        torch.testing.assert_close(grad, grad_ref)


def test_errors_name_the_argument():
    x = torch.randn(4, 4)
    table = tables.residual_table(LEVELS, 3, True, torch.float32)

    def rq(x, levels, q, hc, soft, cf, active):
        return torch.ops.fsq.residual_quantize(x, levels, q, hc, soft, cf, torch.tensor(active), table)

    with pytest.raises(ValueError, match="num_stages must be an int >= 1, got 0"):
        rq(x, list(LEVELS), 0, True, None, False, 0)
    with pytest.raises(ValueError, match=r"active_stages must be an int in \[0, num_stages=3\], got 4"):
        rq(x, list(LEVELS), 3, True, None, False, 4)
    with pytest.raises(ValueError, match="active_stages must be a 0-d tensor"):
        torch.ops.fsq.residual_quantize(x, list(LEVELS), 3, True, None, False, torch.tensor([1, 2]), table)
    with pytest.raises(TypeError, match="active_stages must be an integer tensor"):
        torch.ops.fsq.residual_quantize(x, list(LEVELS), 3, True, None, False, torch.tensor(1.0), table)
    with pytest.raises(ValueError, match="soft_clamp must hold 4 positive values"):
        rq(x, list(LEVELS), 3, True, [1.0, 2.0], False, 3)
    with pytest.raises(ValueError, match="soft_clamp must hold 4 positive values"):
        rq(x, list(LEVELS), 3, True, [1.0, 2.0, 0.0, 1.0], False, 3)
    with pytest.raises(ValueError, match="channels"):
        rq(torch.randn(4, 5), list(LEVELS), 3, True, None, False, 3)
    with pytest.raises(ValueError, match="levels"):
        rq(x, [8, 1, 5, 5], 3, True, None, False, 3)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        rq(torch.ones(4, 4, dtype=torch.int64), list(LEVELS), 3, True, None, False, 3)
    with pytest.raises(ValueError, match="table must end with 12 values"):
        torch.ops.fsq.residual_quantize(x, list(LEVELS), 3, True, None, False, None, table[:-1])
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        torch.ops.fsq.residual_quantize_backward(torch.randn(3, 4), x, list(LEVELS), 3, True, None, False, None, table)


def test_public_api_backend_cpp():
    assert "cpp" in fsq_kernels.available_backends("residual_quantize")
    x = _x((2, 4, 3, 3), torch.float32, seed=9).requires_grad_(True)
    out, idx = fsq_kernels.residual_quantize(x, LEVELS, 4, soft_clamp=PEER_SOFT, channel_first=True,
                                             active_stages=3, backend="cpp")
    out2, idx2 = _rq(x, LEVELS, 4, True, PEER_SOFT, True, 3)
    assert torch.equal(out, out2) and torch.equal(idx, idx2)
    out3, idx3 = fsq_kernels.residual_quantize(x, LEVELS, 4, soft_clamp=PEER_SOFT, channel_first=True,
                                               active_stages=3)  # auto on CPU tensors: cpp
    assert torch.equal(out, out3) and torch.equal(idx, idx3)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    x64 = x.detach().double()
    o64, i64 = fsq_kernels.residual_quantize(x64, LEVELS, 4, channel_first=True, backend="cpp")
    assert o64.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# CUDA kernels (only where the extension was built with CUDA and a GPU is visible): the same
# stage math in float32; the soft clamp's tanh and sech^2 may differ by an ulp (FMA contraction),
# so indices follow the parity rule against the CPU kernel and values agree to float32 rounding.
# ---------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not native.is_available("cuda"), reason="extension built without CUDA or no GPU")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["cl2d", "cl_sliced", "cf4d", "cf4d_channels_last", "cf5d_strided"])
@pytest.mark.parametrize("hc,soft", BOUNDS, ids=BOUND_IDS)
def test_cuda_matches_cpu(hc, soft, layout, dtype):
    x, cf = _layout(layout, 1003, dtype, seed=5)
    x[0, 0] = float("nan")
    x[1, 1] = float("inf")
    q, active = 8, 6
    out, idx = _rq(x, LEVELS, q, hc, soft, cf, active)
    xc = on_device(x, "cuda").requires_grad_(True)  # the same view: the strided CUDA paths run
    out_c, idx_c = _rq(xc, LEVELS, q, hc, soft, cf, active)
    assert out_c.stride() == torch.empty_like(xc).stride() and idx_c.shape == idx.shape
    assert_residual_consistent(idx_c.cpu(), x, LEVELS, soft_clamp=soft, hard_clamp=hc, channel_first=cf)
    assert_residual_parity(idx_c.cpu(), idx, x, LEVELS, soft_clamp=soft, hard_clamp=hc, channel_first=cf)
    same = (_tokens_last(idx_c.cpu(), cf) == _tokens_last(idx, cf)).all(-1)
    if soft is None:  # no transcendental in the forward: bit-identical where the stages agree
        assert torch.equal(_tokens_last(out_c.detach().cpu(), cf)[same].nan_to_num(9.0),
                           _tokens_last(out, cf)[same].nan_to_num(9.0))
    g = _x(x.shape, dtype, seed=3)
    (gx_c,) = torch.autograd.grad(out_c, xc, g.cuda())
    _assert_grad(gx_c, x, g, LEVELS, q, hc, soft, cf, idx_c)


@cuda_only
def test_cuda_large_level_sets_and_int64():
    # both tables (scales + boundaries) exceed the 640 floats of the kernel arguments
    for levels, q in (((300, 300, 300, 300), 6), ((8,) * 16, 40)):
        x = _x((257, len(levels)), torch.float32, seed=1)
        _, idx = _rq(x, levels, q, True, None, False, q)
        _, idx_c = _rq(x.cuda(), levels, q, True, None, False, q)
        assert idx_c.dtype == idx.dtype
        assert_residual_parity(idx_c.cpu(), idx, x, levels, soft_clamp=None, hard_clamp=True)
