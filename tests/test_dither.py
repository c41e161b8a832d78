"""The fused dither (docs/dither.md): noise size and fraction, bit-identical noise on every backend
for a fixed key and offset, the regenerated-noise backward, reproducibility and the op count."""

from __future__ import annotations

import math

import pytest
import torch

import fsq_kernels
from fsq_kernels import dither, ops
from fsq_kernels.ops import backends, dither_ops

from .conftest import TEST_DEVICE

FUSED = [name for name in ("cpp", "cuda", "triton")
         if name in ops.available_backends() and backends.runs_on(name, TEST_DEVICE)]
BACKENDS = ["reference"] + FUSED
KEY_OFFSET = (-8698006509851141745, 988494398293867196)


def _key_offset(device=TEST_DEVICE):
    return torch.tensor(KEY_OFFSET, dtype=torch.int64, device=device)


def _codes(z, levels, channel_first=False):
    num_codebooks = z.shape[1 if channel_first else -1] // len(levels)
    return fsq_kernels.quantize(z, levels, variant="symmetric", channel_first=channel_first,
                                num_codebooks=num_codebooks, backend="reference")[0]


@pytest.mark.parametrize("backend", FUSED)
def test_fused_kernel_is_used(backend):
    assert dither_ops.has_fused_dither(backends.module(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_peer_noise_size_and_fraction(backend, p):
    """z = 0 has code 0 for odd L, so the output is the noise itself wherever it is drawn."""
    n = 20000
    z = torch.zeros(n // 4, 4, device=TEST_DEVICE)
    out = ops.dither(_codes(z, (5, 3, 7, 9)), z, (5, 3, 7, 9), mode="peer", p=p, key_offset=_key_offset(),
                     backend=backend).double().cpu()
    noised = out != 0
    assert abs(noised.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    noise = out[noised]
    assert noise.min() >= -0.5 and noise.max() < 0.5
    m = noise.numel()
    assert abs(noise.mean().item()) < 5 * math.sqrt(1 / 12 / m)
    assert abs(noise.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / m)  # var of (U - 1/2)^2 is 1/180


@pytest.mark.parametrize("backend", BACKENDS)
def test_taae_branch_fractions_per_batch_element(backend):
    """tanh(0.3) = 0.2913 falls on no grid point of L = 5 (code 0.5): the three branches are apart."""
    p, batch, levels = 0.4, 3000, (5,)
    z = torch.full((batch, 2, 1), 0.3, device=TEST_DEVICE)
    out = ops.dither(_codes(z, levels), z, levels, mode="taae", p=p, key_offset=_key_offset(),
                     backend=backend).double().cpu()
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


CASES = [  # (shape, channel_first, levels, dtype, transpose)
    ((7, 33, 6), False, (5, 4, 3), torch.float32, False),
    ((5, 6, 4, 3), True, (8, 5, 5), torch.float32, False),
    ((9, 2, 6), False, (5, 3), torch.float32, True),
    ((4, 11, 8), False, (8, 5, 5, 5), torch.bfloat16, False),
    ((3, 0, 4), False, (5, 3), torch.float32, False),
]


@pytest.mark.parametrize("shape,channel_first,levels,dtype,transpose", CASES)
@pytest.mark.parametrize("mode", ["peer", "taae"])
def test_bit_identical_across_backends(shape, channel_first, levels, dtype, transpose, mode):
    """Same key and offset: the same noise, masks, outputs and gradients everywhere. The peer form
    is exact arithmetic on exact codes (bit for bit); the taae form adds tanh(z), which differs by
    ulps between backends, so its masks and noise are compared at z = 0 (tanh 0 = 0) bit for bit
    and its outputs elsewhere within float32 rounding."""
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(shape, generator=gen) * 1.5).to(dtype).to(TEST_DEVICE)
    if transpose:
        z = z.transpose(0, 1)
    if mode == "taae":
        z = torch.where(torch.rand(z.shape, generator=gen).to(TEST_DEVICE) < 0.5, torch.zeros_like(z), z)
    grad = torch.randn(z.shape, generator=gen).to(dtype).to(TEST_DEVICE)
    results = {}
    for backend in BACKENDS:
        zz = z.clone().requires_grad_()
        codes = _codes(zz, levels, channel_first)
        out = ops.dither(codes, zz, levels, mode=mode, p=0.5, key_offset=_key_offset(),
                         channel_first=channel_first, backend=backend)
        out.backward(grad)
        results[backend] = (out.detach().cpu(), zz.grad.cpu())
    ref_out, ref_grad = results["reference"]
    at_zero = (z == 0).cpu()
    for backend, (out, g) in results.items():
        if mode == "peer":
            assert torch.equal(out, ref_out), backend
            assert torch.equal(g, ref_grad), backend
        else:
            assert torch.equal(out[at_zero], ref_out[at_zero]), backend
            # float32: a few ulps of tanh; bfloat16: those ulps may flip one rounding of the output
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
            torch.testing.assert_close(out, ref_out, **tol)
            torch.testing.assert_close(g, ref_grad, **tol)


def test_reference_is_philox_at_element_counters():
    """The documented counters: element i at offset + i (row-major), batch masks at offset + b*per_batch."""
    z = torch.zeros(3, 4, 2)
    out = dither.apply(_codes(z, (5, 5)), z, (5, 5), "peer", 1.0, _key_offset("cpu"))
    u0 = fsq_kernels.philox.uniform4x(KEY_OFFSET[0], torch.arange(24) + KEY_OFFSET[1])[0]
    assert torch.equal(out.flatten(), u0 - 0.5)


@pytest.mark.parametrize("form", ["peer", "taae"])
def test_manual_seed_reproduces_a_training_step(form):
    fsq = fsq_kernels.FSQ([5, 5, 5], preserve_symmetry=True, noise_dropout=0.3, dither=form).to(TEST_DEVICE)
    z = torch.randn(16, 8, 3, device=TEST_DEVICE)
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


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])
@pytest.mark.parametrize("form", ["peer", "taae"])
def test_train_mode_dispatches_at_most_two_ops_more_than_eval(backend, form):
    fsq = fsq_kernels.FSQ([8, 5, 5, 5], preserve_symmetry=True, noise_dropout=0.5, dither=form, backend=backend)
    z = torch.randn(32, 4, device=TEST_DEVICE)
    fsq.eval()
    eval_ops = _count_ops(lambda: fsq(z))
    fsq.train()
    train_ops = _count_ops(lambda: fsq(z))
    assert train_ops <= eval_ops + 2, (train_ops, eval_ops)


def test_errors_name_the_argument():
    z = torch.zeros(2, 3)
    codes = _codes(z, (5, 5, 5))
    with pytest.raises(ValueError, match="mode"):
        ops.dither(codes, z, (5, 5, 5), mode="gauss", p=0.5)
    with pytest.raises(ValueError, match="p must"):
        ops.dither(codes, z, (5, 5, 5), p=1.5)
    with pytest.raises(ValueError, match="key_offset"):
        ops.dither(codes, z, (5, 5, 5), p=0.5, key_offset=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dither"):
        fsq_kernels.FSQ([5, 5], dither="taae")


@pytest.mark.parametrize("form", ["peer", "taae"])
def test_compiles_fullgraph_and_matches_eager(form):
    """torch.compile(fullgraph=True) traces the dither (and track_usage): same seed, same output."""
    backend = "cpp" if "cpp" in FUSED else "reference"
    fsq = fsq_kernels.FSQ([8, 5, 5, 5], preserve_symmetry=True, noise_dropout=0.5, dither=form, track_usage=True,
                          backend=backend)
    z = torch.randn(64, 4, requires_grad=True)
    compiled = torch.compile(fsq, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out, indices = compiled(z)
    out.sum().backward()
    torch.manual_seed(0)
    eager_out, eager_indices = fsq(z)
    assert torch.equal(out, eager_out) and torch.equal(indices, eager_indices)
    assert int(fsq.usage_counts.sum()) == 2 * 64
