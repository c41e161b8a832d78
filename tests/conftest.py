"""Shared test configuration: level sets, the float64 gradient formula, the test device; the
matching rule and its tolerance tables come from fsq_kernels.matching."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors in the interpreter unless a GPU run is asked for
# (FSQ_TEST_DEVICE=cuda); the variable must be set before triton is imported.
if os.environ.get("FSQ_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fsq_kernels import reference  # noqa: E402
# The matching rule lives in the package, shared with `python -m fsq_kernels check`.
from fsq_kernels.matching import (  # noqa: E402,F401
    GRAD_TOLERANCE,
    assert_matches_reference,
    assert_residual_consistent,
    assert_residual_parity,
    boundary_window,
    channel_last_tokens,
    residual_stage_inputs,
    residual_windows,
)

TEST_DEVICE = os.environ.get("FSQ_TEST_DEVICE", "cpu")

# The paper's Table-1 level sets, small mixes with L = 2, 3, 4, and a set with L in the hundreds.
TABLE1_LEVELS = [(8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5), (8, 8, 8, 5, 5, 5)]
SMALL_MIX_LEVELS = [(2, 3, 4), (4, 2), (3, 3, 2, 5)]
LARGE_LEVELS = [(300, 7)]
VARIANT_CLAMPS = [("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True)]


def expected_grad(z: torch.Tensor, levels, variant: str, hard_clamp: bool, channel_first: bool, num_codebooks: int):
    """docs/design.md "Gradient", written out in float64: dcode/dz per element, z's layout."""
    d = len(levels)
    x = channel_last_tokens(z.detach().cpu().to(torch.float64), channel_first, num_codebooks, d)
    c = reference.channel_constants(levels, variant, hard_clamp)
    shift = torch.tensor(c["shift"], dtype=torch.float64)
    scale = torch.tensor(c["half_l"], dtype=torch.float64) / torch.tensor(c["half_width"], dtype=torch.float64)
    if variant == "symmetric":
        shift, scale = torch.zeros_like(shift), torch.ones_like(scale)
    u = x + shift
    grad = ((u > -1) & (u < 1)).to(torch.float64) if hard_clamp else 1 - torch.tanh(u) ** 2
    grad = (grad * scale).flatten(-2)
    return grad.movedim(-1, 1) if channel_first else grad


@pytest.fixture
def device():
    return torch.device(TEST_DEVICE)


# ---------------------------------------------------------------------------------------------
# Device-aware parametrization: a backend's tensors are built on the device it runs on
# ---------------------------------------------------------------------------------------------

HAS_GPU = torch.cuda.is_available()


def backend_device(backend: str) -> torch.device:
    """Where `backend`'s inputs live in this run: `cuda` on the GPU, `cpp` on the CPU, `triton` on
    the GPU with FSQ_TEST_DEVICE=cuda (else in the interpreter, on the CPU), `reference` on the
    test device."""
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "cpp":
        return torch.device("cpu")
    return torch.device(TEST_DEVICE)


def backend_params(op: str = "quantize") -> list:
    """pytest params (backend, device) for every backend available here that implements `op`;
    GPU backends carry the `gpu` marker."""
    import fsq_kernels

    params = []
    for name in fsq_kernels.available_backends(op):
        dev = backend_device(name)
        params.append(pytest.param(name, dev, id=name, marks=[pytest.mark.gpu] if dev.type == "cuda" else []))
    return params


def cpu_backends(op: str = "quantize") -> list[str]:
    """The backends available here that take CPU tensors in this run (see backend_device)."""
    import fsq_kernels

    return [name for name in fsq_kernels.available_backends(op) if backend_device(name).type == "cpu"]


def on_device(t: torch.Tensor, device) -> torch.Tensor:
    """t's values on `device` with t's exact strides and storage offset: a non-dense or
    overlapping view stays one there (`t.cuda()` would make it dense and contiguous)."""
    t = t.detach()
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,))
    return flat.to(device, copy=True).as_strided(t.size(), t.stride(), t.storage_offset())


@pytest.fixture(autouse=True)
def _no_flush_to_zero_leak():
    """The training commands turn on flush-to-zero (torch.set_flush_denormal) for speed; tests
    that call them in-process must not leave it on for the exactness tests that follow."""
    yield
    torch.set_flush_denormal(False)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip where no GPU is visible."""
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a visible CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
