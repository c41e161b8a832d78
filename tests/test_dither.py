"""The dither, fused into the quantize kernels (docs/dither.md): noise size and fraction, outputs
bit-identical to the reference (quantize, then fsq_kernels.dither.apply) for a fixed key and
offset on every backend, noiseless indices, the histogram of the same pass, gradients equal to the
two-op chain, reproducibility and the dispatched-op count."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fsq_kernels
from fsq_kernels import dither, ops

from .conftest import backend_params

TRAIN_BACKENDS = backend_params("quantize_train")
KEY_OFFSET = (-8698006509851141745, 988494398293867196)


def _key_offset(device):
    return torch.tensor(KEY_OFFSET, dtype=torch.int64, device=device)


def _train(z, levels, mode, p, backend, channel_first=False, num_codebooks=1, hard_clamp=False, return_usage=False):
    return ops.quantize_train(z, levels, variant="symmetric", hard_clamp=hard_clamp, channel_first=channel_first,
                              num_codebooks=num_codebooks, dither=mode, dither_p=p, key_offset=_key_offset(z.device),
                              return_usage=return_usage, backend=backend)


def test_cpp_has_the_fused_training_op():
    if "cpp" not in fsq_kernels.available_backends():
        pytest.skip("the extension is not built")
    if not hasattr(torch.ops.fsq, "quantize_train"):
        pytest.skip("this build of the extension predates fsq::quantize_train")
    assert "cpp" in fsq_kernels.available_backends("quantize_train")


@pytest.mark.parametrize("backend,device", TRAIN_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_peer_noise_size_and_fraction(backend, device, p):
    """z = 0 has code 0 for odd L, so the output is the noise itself wherever it is drawn."""
    n = 20000
    z = torch.zeros(n // 4, 4, device=device)
    out = _train(z, (5, 3, 7, 9), "peer", p, backend)[0].double().cpu()
    noised = out != 0
    assert abs(noised.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    noise = out[noised]
    assert noise.min() >= -0.5 and noise.max() < 0.5
    m = noise.numel()
    assert abs(noise.mean().item()) < 5 * math.sqrt(1 / 12 / m)
    assert abs(noise.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / m)  # var of (U - 1/2)^2 is 1/180


@pytest.mark.parametrize("backend,device", TRAIN_BACKENDS)
def test_taae_branch_fractions_per_batch_element(backend, device):
    """tanh(0.3) = 0.2913 falls on no grid point of L = 5 (code 0.5): the three branches are apart."""
    p, batch, levels = 0.4, 3000, (5,)
    z = torch.full((batch, 2, 1), 0.3, device=device)
    out = _train(z, levels, "taae", p, backend)[0].double().cpu()
    t = math.tanh(0.3)
    unquantized = (out - t).abs() < 1e-6
    quantized = out == 0.5
    noised = ~(unquantized | quantized)
    for branch in (unquantized, quantized, noised):  # one branch per batch element
        assert (branch.all(dim=(1, 2)) | ~branch.any(dim=(1, 2))).all()
    for branch, prob in ((noised, 1 - p), (unquantized, p * p), (quantized, p * (1 - p))):
        frac = branch[:, 0, 0].double().mean().item()
        assert abs(frac - prob) < 5 * math.sqrt(prob * (1 - prob) / batch)
    noise = (out[noised] - t) / 0.5  # step 2/(L-1) = 0.5
    assert noise.abs().max() <= 0.5 + 1e-6
    assert abs(noise.var().item() - 1 / 12) < 0.01


CASES = {  # shape, channel_first, levels, num_codebooks, dtype, transpose, hard_clamp
    "odd": ((7, 33, 6), False, (5, 4, 3), 2, torch.float32, False, False),
    "channel_first": ((5, 6, 4, 3), True, (8, 5, 5), 2, torch.float32, False, False),
    "non_contiguous": ((9, 2, 6), False, (5, 3), 3, torch.float32, True, False),
    "bf16": ((4, 11, 8), False, (8, 5, 5, 5), 2, torch.bfloat16, False, False),
    "hard_clamp": ((3, 5, 4), False, (4, 7), 2, torch.float32, False, True),
    "one_dim": ((4,), False, (3, 6), 2, torch.float32, False, False),
    "empty": ((3, 0, 4), False, (5, 3), 2, torch.float32, False, False),
}


@pytest.mark.parametrize("backend,device", TRAIN_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["peer", "taae"])
def test_fused_training_forward_matches_the_two_op_chain(backend, device, case, mode):
    """codes = dither.apply(quantize(z)) for the fixed key and offset; indices = quantize's (the
    noiseless code's); usage = bincount of them (NaN tokens skipped); grad_z = the gradient of
    the backend's quantize followed by the reference dither. The peer form is exact arithmetic on
    exact codes (bit for bit); the taae form adds tanh(z), which differs by ulps between backends,
    so its masks and noise are compared at z = 0 (tanh 0 = 0) bit for bit and elsewhere within
    float32 rounding."""
    shape, channel_first, levels, ncb, dtype, transpose, hard_clamp = CASES[case]
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=gen) * 1.5
    if mode == "taae":
        z = torch.where(torch.rand(z.shape, generator=gen) < 0.5, torch.zeros_like(z), z)
    if z.numel() > 4:
        z.view(-1)[3] = float("nan")
    z = z.to(dtype).to(device)
    grad = torch.randn(shape, generator=gen).to(dtype).to(device)
    if transpose:
        z, grad = z.transpose(0, 1), grad.transpose(0, 1)
    zz = z.clone().requires_grad_()
    codes, indices, usage = _train(zz, levels, mode, 0.5, backend, channel_first, ncb, hard_clamp, True)
    codes.backward(grad)

    zc = z.clone().requires_grad_()
    kwargs = dict(variant="symmetric", hard_clamp=hard_clamp, channel_first=channel_first, num_codebooks=ncb)
    chain_codes, chain_indices = fsq_kernels.quantize(zc, levels, backend=backend, **kwargs)
    chain = dither.apply(chain_codes, zc, levels, mode, 0.5, _key_offset(device), channel_first)
    chain.backward(grad)
    ref_codes, ref_indices = fsq_kernels.quantize(z, levels, backend="reference", **kwargs)
    ref = dither.apply(ref_codes, z, levels, mode, 0.5, _key_offset(device), channel_first)

    assert codes.shape == z.shape and codes.dtype == z.dtype
    assert torch.equal(indices, ref_indices) and torch.equal(indices, chain_indices)
    assert torch.equal(usage.cpu(), ops._reference.histogram(ref_indices.cpu(), ncb, math.prod(levels)))
    assert int(usage.sum()) == int((ref_indices >= 0).sum())
    out, ref, g, g_chain = codes.detach().cpu(), ref.cpu(), zz.grad.cpu(), zc.grad.cpu()
    if mode == "peer":
        assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
        assert torch.equal(g.nan_to_num(7.0), g_chain.nan_to_num(7.0))
    else:
        at_zero = (z == 0).cpu()
        assert torch.equal(out[at_zero], ref[at_zero])
        # float32: a few ulps of tanh; bfloat16: those ulps may flip one rounding of the output
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
        torch.testing.assert_close(out, ref, equal_nan=True, **tol)
        torch.testing.assert_close(g, g_chain, equal_nan=True, **tol)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 5), tokens=st.integers(1, 9), levels=st.lists(st.integers(2, 9), min_size=1, max_size=4),
       num_codebooks=st.integers(1, 3), channel_first=st.booleans(), mode=st.sampled_from([None, "peer", "taae"]),
       p=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_fused_backends_agree_with_the_reference_fuzzed(batch, tokens, levels, num_codebooks, channel_first, mode, p,
                                                        seed):
    """Random shapes, level sets, codebooks, layouts and p: every fused backend's codes (peer and
    no dither bit for bit, taae within float32 rounding), indices and histogram equal the reference's."""
    channels = len(levels) * num_codebooks
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, tokens) if channel_first else (batch, tokens, channels)
    z = torch.randn(shape, generator=gen) * 2
    key_offset = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=gen)
    kwargs = dict(variant="symmetric", channel_first=channel_first, num_codebooks=num_codebooks, dither=mode,
                  dither_p=p, return_usage=True)
    ref = ops.quantize_train(z, levels, key_offset=key_offset, backend="reference", **kwargs)
    for param in TRAIN_BACKENDS:
        backend, device = param.values
        if backend == "reference":
            continue
        codes, indices, usage = ops.quantize_train(z.to(device), levels, key_offset=key_offset.to(device),
                                                   backend=backend, **kwargs)
        assert torch.equal(indices.cpu(), ref[1]) and torch.equal(usage.cpu(), ref[2]), backend
        if mode == "taae":
            torch.testing.assert_close(codes.cpu(), ref[0], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(codes.cpu(), ref[0]), backend


@pytest.mark.parametrize("backend,device", TRAIN_BACKENDS)
def test_without_dither_codes_equal_quantize(backend, device):
    """dither=None: the codes and gradient are quantize's, the usage the bincount."""
    z = (torch.randn(5, 7, 8) * 2).to(device).requires_grad_()
    codes, indices, usage = ops.quantize_train(z, (8, 5, 5, 5), num_codebooks=2, return_usage=True, backend=backend)
    want, want_indices = fsq_kernels.quantize(z, (8, 5, 5, 5), num_codebooks=2, backend=backend)
    assert torch.equal(codes, want) and torch.equal(indices, want_indices)
    assert torch.equal(usage.cpu(), ops._reference.histogram(indices.cpu(), 2, 1000))
    g, = torch.autograd.grad(codes.sum(), z)
    assert torch.equal(g, torch.autograd.grad(want.sum(), z)[0])
    assert ops.quantize_train(z, (8, 5, 5, 5), num_codebooks=2, backend=backend)[2] is None


@pytest.mark.parametrize("backend,device", [p for p in TRAIN_BACKENDS if p.values[0] != "reference"])
@pytest.mark.parametrize("mode", ["peer", "taae"])
def test_opcheck(backend, device, mode):
    """Schema, fake tensor and autograd registration of quantize_train and of quantize_backward
    with the dither arguments, in the backend's namespace."""
    from fsq_kernels.ops import tables

    namespace = torch.ops.fsq_triton if backend == "triton" else torch.ops.fsq
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if device.type == "cuda" or backend == "cpp":
        tests.append("test_aot_dispatch_dynamic")  # tracing runs the kernels: not in the interpreter
    z = torch.randn(3, 6, 4, device=device).requires_grad_()
    levels, table = [5, 4, 3], tables.quantize_table((5, 4, 3), "symmetric", False, torch.float32)
    dither_args = (_key_offset(device), dither.mode_id(mode), 0.5, list(dither.steps(levels)))
    torch.library.opcheck(namespace.quantize_train.default,
                          (z, levels, "symmetric", False, True, 2, table, *dither_args, True), test_utils=tests)
    torch.library.opcheck(namespace.quantize_backward.default,
                          (torch.randn_like(z), z.detach(), levels, "symmetric", False, True, 2, table, *dither_args),
                          test_utils=tests)


def test_reference_is_philox_at_element_counters():
    """The documented counters: element i at offset + i (row-major), batch masks at offset + b*per_batch."""
    z = torch.zeros(3, 4, 2)
    out = _train(z, (5, 5), "peer", 1.0, "reference")[0]
    u0 = fsq_kernels.philox.uniform4x(KEY_OFFSET[0], torch.arange(24) + KEY_OFFSET[1])[0]
    assert torch.equal(out.flatten(), u0 - 0.5)


@pytest.mark.parametrize("form", ["peer", "taae"])
def test_manual_seed_reproduces_a_training_step(form, device):
    fsq = fsq_kernels.FSQ([5, 5, 5], preserve_symmetry=True, noise_dropout=0.3, dither=form).to(device)
    z = torch.randn(16, 8, 3, device=device)
    torch.manual_seed(5)
    first, indices = fsq(z)
    second, _ = fsq(z)
    torch.manual_seed(5)
    again, indices_again = fsq(z)
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert torch.equal(indices, indices_again)
    assert torch.equal(indices, fsq_kernels.quantize(z, [5, 5, 5], variant="symmetric")[1])  # noiseless


def _count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.ops


@pytest.mark.parametrize("backend,device", [p for p in TRAIN_BACKENDS if p.values[0] in ("cpp", "cuda")])
@pytest.mark.parametrize("form", ["peer", "taae"])
def test_train_mode_dispatches_at_most_two_ops_more_than_eval(backend, device, form):
    """Train mode with dither and track_usage: the key draw, the fused op and the buffer's add_."""
    fsq = fsq_kernels.FSQ([8, 5, 5, 5], preserve_symmetry=True, noise_dropout=0.5, dither=form, track_usage=True,
                          backend=backend).to(device)
    z = torch.randn(32, 4, device=device)
    fsq.eval()
    eval_ops = _count_ops(lambda: fsq(z))
    fsq.train()
    train_ops = _count_ops(lambda: fsq(z))
    assert train_ops <= eval_ops + 2, (train_ops, eval_ops)
    assert int(fsq.usage_counts.sum()) == 32


def test_errors_name_the_argument():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dither must be"):
        ops.quantize_train(z, (5, 5, 5), variant="symmetric", dither="gauss")
    with pytest.raises(ValueError, match="dither_p must"):
        ops.quantize_train(z, (5, 5, 5), variant="symmetric", dither="peer", dither_p=1.5)
    with pytest.raises(ValueError, match="needs variant 'symmetric'"):
        ops.quantize_train(z, (5, 5, 5), dither="peer", dither_p=0.5)
    with pytest.raises(ValueError, match="key_offset must have shape"):
        ops.quantize_train(z, (5, 5, 5), variant="symmetric", dither="peer", key_offset=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="key_offset must be int64"):
        ops.quantize_train(z, (5, 5, 5), variant="symmetric", dither="peer", key_offset=torch.zeros(2))
    with pytest.raises(ValueError, match="return_usage"):
        ops.quantize_train(torch.zeros(2, 8), (4096,) * 2 + (16,) * 6, return_usage=True)
    with pytest.raises(ValueError, match="channels"):
        ops.quantize_train(z, (5, 5), variant="symmetric", dither="peer")
    with pytest.raises(ValueError, match="dither"):
        fsq_kernels.FSQ([5, 5], dither="taae")


_COMPILE_JOB = """
import json, torch
from tests.test_triton_static import _capture_launch, _compile_captured, _ptxas_report
from fsq_kernels import dither
from fsq_kernels.ops import tables
from fsq_kernels.ops.triton import payload
from fsq_kernels.triton import fsq
from fsq_kernels.triton.dither import DitherArgs
levels, out = (8, 5, 5, 5), []
for dtype, channel_first, mode in ((torch.float32, False, 1), (torch.bfloat16, True, 2)):
    z = torch.empty((2, 8, 32, 32) if channel_first else (4096, 8), dtype=dtype, device="meta")
    cst = payload(levels, "symmetric", False, tuple(tables.quantize_table(levels, "symmetric", False, dtype)))
    args = DitherArgs(mode, 0.5, dither.steps(levels), torch.empty(2, dtype=torch.int64, device="meta"))
    usage = torch.empty(2, 1000, dtype=torch.int64, device="meta")
    for launcher, a, kw in ((fsq.fsq_forward, (z, cst, 2, False, channel_first, 2, True), dict(dither=args, usage=usage)),
                            (fsq.fsq_backward, (torch.empty_like(z), z, cst, 2, False, channel_first, 2), dict(dither=args))):
        kernel, _, ka, kkw = _capture_launch(launcher, *a, **kw)
        ptx = _compile_captured(kernel, ka, dict(kkw), 90).asm["ptx"]
        out.append(dict(_ptxas_report(ptx, 90), atomics=ptx.count("atom.global") + ptx.count("red.global")))
print(json.dumps(out))
"""


def test_fused_triton_kernels_compile_for_sm90_without_spills():
    """The dithered, histogram-counting forward and the dithered backward compile for a real GPU
    (sm_90, the Triton compiler rather than the interpreter the other tests run) without spills."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_JOB], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["spill_store_bytes"] + r["spill_load_bytes"] for r in reports] == [0, 0, 0, 0]
    assert reports[0]["atomics"] > 0 and reports[2]["atomics"] > 0  # the forwards count the histogram
