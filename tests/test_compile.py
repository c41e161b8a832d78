"""torch.compile(fullgraph=True) and torch.export through the public API and the modules.

fullgraph=True passing is the proof of zero graph breaks. Each case is compiled with the
aot_eager backend (graph capture, AOT autograd and the backward, without code generation) and
dynamic=True; a second batch size must not recompile, and compiled results must equal eager ones:
indices exactly, outputs and gradients allclose (a compiled projection may move a few ulps).
Inductor runs on a few representative cases. Triton and CUDA cases need a GPU (`gpu` marker): the
Triton interpreter cannot be compiled.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fsq_kernels
from fsq_kernels import FSQ, GroupedResidualFSQ, ResidualFSQ

LEVELS = [8, 5, 5, 5]
CPU_BACKENDS = [b for b in ("reference", "cpp") if b in fsq_kernels.available_backends()]
HAS_GPU = torch.cuda.is_available()
GPU_BACKENDS = [
    pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")])
    for b in ("cuda", "triton")
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _device(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def _tensors(out):
    """The tensors of a (possibly nested) result, in order; None entries dropped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _call(fn, inputs, params, seed: int):
    """Run fn on fresh leaf copies of inputs; return (tensors of the result, grads of inputs and params)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    out = _tensors(fn(*leaves))
    floats = [t for t in out if t.is_floating_point() and t.requires_grad]
    if floats:
        sum(t.float().square().sum() for t in floats).backward()
    grads = [x.grad for x in leaves if x.is_floating_point()] + [p.grad for p in params]
    return [t.detach() for t in out], grads


def _assert_same(eager, compiled, rtol=1e-5, atol=1e-6):
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled):
        if a is None or b is None:
            assert a is None and b is None
        elif a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
        else:
            assert torch.equal(a, b), "compiled indices differ from eager ones"


def check_compiles(fn, make_inputs, params=(), backend="aot_eager", sizes=(11, 13)):
    """fullgraph + dynamic compile of fn; equal to eager (forward and backward) at each batch
    size; no recompile after the first size."""
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = None
    for size in sizes:
        inputs = make_inputs(size)
        eager_out, eager_grads = _call(fn, inputs, params, seed=size)
        out, grads = _call(compiled, inputs, params, seed=size)
        _assert_same(eager_out, out)
        _assert_same(eager_grads, grads, rtol=1e-4, atol=1e-5)
        if frames is None:
            frames = counter.frame_count
            assert frames >= 1
        else:
            assert counter.frame_count == frames, f"recompiled at batch size {size}"


# ---------------------------------------------------------------------------------------------
# The functional API
# ---------------------------------------------------------------------------------------------

QUANTIZE_CASES = [
    # (variant, hard_clamp, channel_first, num_codebooks, return_indices)
    ("paper", False, False, 1, True),
    ("symmetric", True, True, 1, True),
    ("atanh", False, False, 2, True),
    ("paper", False, True, 2, False),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("variant,hard_clamp,channel_first,num_codebooks,return_indices", QUANTIZE_CASES)
def test_quantize_compiles(backend, variant, hard_clamp, channel_first, num_codebooks, return_indices):
    device, channels = _device(backend), len(LEVELS) * num_codebooks

    def fn(z):
        return fsq_kernels.quantize(
            z, LEVELS, variant=variant, hard_clamp=hard_clamp, channel_first=channel_first,
            num_codebooks=num_codebooks, return_indices=return_indices, backend=backend,
        )

    shape = (lambda b: (b, channels, 3, 5)) if channel_first else (lambda b: (b, 7, channels))
    check_compiles(fn, lambda b: [torch.randn(shape(b), device=device) * 2])


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("channel_first,num_codebooks", [(False, 1), (True, 2)])
def test_indices_to_codes_compiles(backend, channel_first, num_codebooks):
    device = _device(backend)

    def fn(indices):
        return fsq_kernels.indices_to_codes(
            indices, LEVELS, channel_first=channel_first, num_codebooks=num_codebooks, backend=backend
        )

    tail = (num_codebooks,) if num_codebooks > 1 else ()
    check_compiles(fn, lambda b: [torch.randint(0, 1000, (b, 4, 3) + tail, device=device)])


def test_index_range_check_under_compile_raises_runtime_error():
    fn = torch.compile(lambda i: fsq_kernels.indices_to_codes(i, LEVELS), backend="aot_eager", fullgraph=True)
    assert fn(torch.tensor([0, 999])).shape == (2, 4)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 1000\)"):
        fn(torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 1000\)"):  # eager keeps ValueError
        fsq_kernels.indices_to_codes(torch.tensor([-1]), LEVELS)


def test_codes_to_indices_compiles():
    check_compiles(lambda c: fsq_kernels.codes_to_indices(c, LEVELS), lambda b: [torch.randn(b, 6, 4)])


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("channel_first,dropout", [(False, False), (True, True)])
def test_residual_quantize_compiles(backend, channel_first, dropout):
    device = _device(backend)

    def fn(x):
        active = torch.randint(0, 5, (), device=x.device) if dropout else None
        return fsq_kernels.residual_quantize(
            x, LEVELS, 4, soft_clamp=[1.2] * 4, channel_first=channel_first, active_stages=active, backend=backend
        )

    shape = (lambda b: (b, 4, 3, 2)) if channel_first else (lambda b: (b, 5, 4))
    check_compiles(fn, lambda b: [torch.randn(shape(b), device=device)])


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

FSQ_CASES = {
    "projections": (dict(dim=64), lambda b: (b, 7, 64)),
    "channel_first": (dict(channel_first=True), lambda b: (b, 4, 3, 5)),
    "channel_first_projections": (dict(dim=16, channel_first=True), lambda b: (b, 16, 3, 5)),
    "codebooks": (dict(dim=32, num_codebooks=2), lambda b: (b, 5, 32)),
    "no_indices": (dict(dim=32, return_indices=False), lambda b: (b, 5, 32)),
    "rotation": (dict(orthogonal_rotation=True), lambda b: (b, 5, 4)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(FSQ_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fsq_module_compiles(backend, case, training):
    kwargs, shape = FSQ_CASES[case]
    device = _device(backend)
    module = FSQ(LEVELS, backend=backend, **kwargs).to(device).train(training)
    check_compiles(module, lambda b: [torch.randn(shape(b), device=device)], params=list(module.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("form", ["peer", "taae"])
def test_fsq_dither_and_usage_compile(backend, form):
    """FSQ(noise_dropout > 0, track_usage=True) in train mode: the key draw, the fused
    quantize_train op and the usage buffer's add_ trace with fullgraph; the same seed gives the
    same output and gradient, and the histogram counts every call, eager and compiled."""
    if backend not in fsq_kernels.available_backends("quantize_train"):
        pytest.skip(f"this build of the {backend} backend has no quantize_train")
    device = _device(backend)
    module = FSQ(LEVELS, preserve_symmetry=True, noise_dropout=0.5, dither=form, track_usage=True,
                 backend=backend).to(device)
    check_compiles(module, lambda b: [torch.randn(b, 5, 4, device=device)])
    assert int(module.usage_counts.sum()) == 2 * (11 + 13) * 5


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("quantize_dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("channel_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_fsq_compiles(backend, quantize_dropout, channel_first, training):
    device = _device(backend)
    module = ResidualFSQ(
        levels=LEVELS, num_quantizers=4, dim=16, is_channel_first=channel_first,
        quantize_dropout=quantize_dropout, backend=backend,
    ).to(device).train(training)
    shape = (lambda b: (b, 16, 3, 2)) if channel_first else (lambda b: (b, 5, 16))
    check_compiles(module, lambda b: [torch.randn(shape(b), device=device)], params=list(module.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("quantize_dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grouped_residual_fsq_compiles(backend, quantize_dropout, training):
    device = _device(backend)
    module = GroupedResidualFSQ(
        dim=16, groups=2, levels=LEVELS, num_quantizers=3, quantize_dropout=quantize_dropout, backend=backend
    ).to(device).train(training)
    check_compiles(module, lambda b: [torch.randn(b, 5, 16, device=device)], params=list(module.parameters()))


def test_fsq_compiles_under_bf16_autocast():
    module = FSQ(LEVELS, dim=32)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x)

    check_compiles(fn, lambda b: [torch.randn(b, 5, 32)], params=list(module.parameters()))


INDUCTOR_CASES = {
    "fsq_projections_train": lambda: (FSQ(LEVELS, dim=64), lambda b: [torch.randn(b, 7, 64)]),
    "residual_fsq_dropout_eval": lambda: (
        ResidualFSQ(levels=LEVELS, num_quantizers=4, dim=16, quantize_dropout=True).eval(),
        lambda b: [torch.randn(b, 5, 16)],
    ),
    "quantize_reference_channel_first": lambda: (
        lambda z: fsq_kernels.quantize(z, LEVELS, channel_first=True, backend="reference"),
        lambda b: [torch.randn(b, 4, 3, 5)],
    ),
}


@pytest.mark.parametrize("case", sorted(INDUCTOR_CASES))
def test_inductor(case):
    fn, make_inputs = INDUCTOR_CASES[case]()
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    check_compiles(fn, make_inputs, params=params, backend="inductor", sizes=(11,))


# ---------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------

EXPORT_CASES = {
    "fsq": lambda: (FSQ(LEVELS, dim=32), (5, 32)),
    "residual_fsq_dropout": lambda: (ResidualFSQ(levels=LEVELS, num_quantizers=4, dim=16, quantize_dropout=True), (5, 16)),
    "grouped_residual_fsq": lambda: (
        GroupedResidualFSQ(dim=16, groups=2, levels=LEVELS, num_quantizers=3, quantize_dropout=True), (5, 16)
    ),
}


def _outputs(module, x, seed):
    # Grad mode stays on: quantize dropout, like the peer's, only runs when grad is enabled, and
    # the program was exported with grad enabled.
    torch.manual_seed(seed)
    return [t.detach() for t in _tensors(module(x))]


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_save_load_matches_eager(case, training):
    module, tail = EXPORT_CASES[case]()
    module.train(training)
    batch = torch.export.Dim("batch", min=1)
    x = torch.randn(3, *tail)
    torch.manual_seed(0)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for size in (11, 13):  # a second batch size through the dynamic Dim
        x = torch.randn(size, *tail)
        _assert_same(_outputs(module, x, seed=size), _outputs(loaded, x, seed=size))


def test_exported_program_runs_in_a_fresh_process(tmp_path):
    module = ResidualFSQ(levels=LEVELS, num_quantizers=3, dim=16).eval()
    x = torch.randn(4, 5, 16)
    program = torch.export.export(module, (x,))
    torch.export.save(program, tmp_path / "rfsq.pt2")
    quantized, indices = module(x)
    torch.save({"x": x, "quantized": quantized.detach(), "indices": indices}, tmp_path / "expected.pt")
    script = (
        "import sys, torch, fsq_kernels\n"
        "expected = torch.load(sys.argv[2])\n"
        "quantized, indices = torch.export.load(sys.argv[1]).module()(expected['x'])\n"
        "assert torch.equal(indices, expected['indices'])\n"
        "torch.testing.assert_close(quantized, expected['quantized'])\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "rfsq.pt2"), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync_on_cuda(backend):
    """Forward and backward of every module, quantize dropout's shared draw included, run with
    CUDA's sync debug mode set to raise on any host synchronisation."""
    if backend not in fsq_kernels.available_backends():
        pytest.skip(f"{backend} not available")
    modules = [
        (FSQ(LEVELS, dim=32, backend=backend), (6, 5, 32)),
        (ResidualFSQ(levels=LEVELS, num_quantizers=4, dim=16, quantize_dropout=True, backend=backend), (6, 5, 16)),
        (GroupedResidualFSQ(dim=16, groups=2, levels=LEVELS, num_quantizers=3, quantize_dropout=True, backend=backend),
         (6, 5, 16)),
    ]
    for module, shape in modules:
        module = module.cuda().train()
        x = torch.randn(shape, device="cuda", requires_grad=True)
        module(x)  # warm-up: lazy initialisation may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = module(x)[0]
            out.square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
