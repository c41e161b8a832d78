"""Benchmark cases and providers, shared by the pytest-benchmark suite and the report.

A provider turns a Case into a zero-argument callable that does the work once. Names are the ones
every output uses: fsq_kernels[cpp], fsq_kernels[cuda], fsq_kernels[triton], reference,
vector-quantize-pytorch, torch.compile(vector-quantize-pytorch); plus the floor (one allocating
torch.tanh over the same tensor on CPU; a device-to-device copy of it on CUDA). Module cases
(Case.dim > 0) time a whole FSQ module with its projections, as a training job calls it, and add
torch.compile(fsq_kernels.FSQ) as a provider.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

import fsq_kernels

MODES = ("forward", "backward", "forward+backward", "decode")
LEVEL_SETS = ((8, 5, 5, 5), (8, 8, 8, 5, 5, 5))
LAYOUTS = ("channel-last", "channel-first")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOOR = "floor"
VQP = "vector-quantize-pytorch"
VQP_COMPILED = "torch.compile(vector-quantize-pytorch)"
# vector-quantize-pytorch uses the atanh bound; every provider runs the same variant.
VARIANT = "atanh"


@dataclass(frozen=True)
class Case:
    mode: str
    dtype: str
    levels: tuple[int, ...]
    layout: str
    tokens: int
    device: str = "cpu"
    stages: int = 0  # > 0: ResidualFSQ with this many stages (vector-quantize-pytorch's defaults)
    dim: int = 0  # > 0: the FSQ module with projections dim -> len(levels) -> dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def channel_first(self) -> bool:
        return self.layout == "channel-first"

    @property
    def op(self) -> str:
        if self.dim:
            return "module"
        return "residual_quantize" if self.stages else "quantize"

    @property
    def quantizer(self) -> str:
        if self.dim:
            return f"FSQ module dim={self.dim}"
        return f"ResidualFSQ-{self.stages}" if self.stages else "FSQ"

    def label(self) -> str:
        levels = "x".join(map(str, self.levels))
        return f"{self.quantizer}-{self.mode}-{self.dtype}-{levels}-{self.layout}-2^{int(math.log2(self.tokens))}"


def make_input(case: Case, seed: int = 0) -> torch.Tensor:
    """z with case.tokens tokens: (B, N, d) channel-last or (B, d, H, W) channel-first; d is the
    module's dim for module cases."""
    d = case.dim or len(case.levels)
    batch = 16 if case.tokens >= 256 else 1
    per_item = case.tokens // batch
    g = torch.Generator().manual_seed(seed)
    if case.channel_first:
        height = 2 ** (int(math.log2(per_item)) // 2)
        z = torch.randn(batch, d, height, per_item // height, generator=g)
    else:
        z = torch.randn(batch, per_item, d, generator=g)
    return (z * 2).to(device=case.device, dtype=case.torch_dtype)


def minimal_bytes(case: Case) -> int:
    """Bytes the op must move at least: what a fused kernel reads and writes once."""
    n = case.tokens * (case.dim or len(case.levels))
    elem = torch.finfo(case.torch_dtype).bits // 8
    index_bytes = case.tokens * 4
    return {
        "forward": 2 * n * elem + index_bytes,
        "backward": 3 * n * elem,
        "forward+backward": 2 * n * elem + index_bytes + 3 * n * elem,
        "decode": index_bytes + n * elem,
    }[case.mode]


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


def _module(modules: dict, case: Case, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """One module per case shape, initialised from the same seed whoever builds it."""
    key = (case.levels, case.dim, case.device)
    if key not in modules:
        torch.manual_seed(0)
        modules[key] = make().to(case.device)
    return modules[key]


def _fsq_kernels_quantize(backend: str, compiled: bool = False) -> Callable:
    modules: dict = {}

    def make_module(case: Case):
        module = fsq_kernels.FSQ(list(case.levels), dim=case.dim, variant=VARIANT, backend=backend)
        return torch.compile(module) if compiled else module

    def quantize(z: torch.Tensor, case: Case):
        if case.dim:
            return _module(modules, case, lambda: make_module(case))(z)
        if case.stages:
            return fsq_kernels.residual_quantize(
                z, case.levels, case.stages, soft_clamp=fsq_kernels.reference.residual_soft_clamp(case.levels),
                channel_first=case.channel_first, backend=backend,
            )
        return fsq_kernels.quantize(z, case.levels, variant=VARIANT, channel_first=case.channel_first, backend=backend)

    def decode(indices: torch.Tensor, case: Case):
        return fsq_kernels.indices_to_codes(
            indices, case.levels, variant=VARIANT, channel_first=case.channel_first, dtype=case.torch_dtype, backend=backend
        )

    return quantize, decode


def _vqp_functions(compiled: bool):
    from vector_quantize_pytorch import FSQ as PeerFSQ
    from vector_quantize_pytorch import ResidualFSQ as PeerResidualFSQ

    modules: dict = {}

    def module(case: Case):
        if case.dim:
            make = lambda: PeerFSQ(list(case.levels), dim=case.dim)  # noqa: E731
            return _module(modules, case, (lambda: torch.compile(make())) if compiled else make), None
        key = (case.levels, case.channel_first, case.stages)
        if key not in modules:
            if case.stages:
                peer = PeerResidualFSQ(levels=list(case.levels), num_quantizers=case.stages, is_channel_first=case.channel_first)
            else:
                peer = PeerFSQ(list(case.levels), channel_first=case.channel_first)
            peer = peer.to(case.device)
            forward, decode = peer.forward, getattr(peer, "indices_to_codes", None)
            if compiled:
                forward, decode = torch.compile(forward), decode and torch.compile(decode)
            modules[key] = (forward, decode)
        return modules[key]

    def quantize(z: torch.Tensor, case: Case):
        return module(case)[0](z)

    def decode(indices: torch.Tensor, case: Case):
        return module(case)[1](indices)

    return quantize, decode


def _backend_available(backend: str, device: str, op: str = "quantize") -> bool:
    if backend == "triton" and device == "cpu":
        return False  # the interpreter is a correctness tool, not a benchmark provider
    return backend in fsq_kernels.available_backends("quantize" if op == "module" else op)


def _vqp_available(device: str, op: str) -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Provider:
    name: str
    available: Callable[[str, str], bool]  # (device, op) -> bool; op "quantize" or "residual_quantize"
    functions: Callable[[], tuple[Callable, Callable]]
    compiled: bool = False


PROVIDERS = [
    Provider("fsq_kernels[cpp]", lambda dev, op: dev == "cpu" and _backend_available("cpp", dev, op), lambda: _fsq_kernels_quantize("cpp")),
    Provider("fsq_kernels[cuda]", lambda dev, op: dev == "cuda" and _backend_available("cuda", dev, op), lambda: _fsq_kernels_quantize("cuda")),
    Provider("fsq_kernels[triton]", lambda dev, op: _backend_available("triton", dev, op), lambda: _fsq_kernels_quantize("triton")),
    Provider("reference", lambda dev, op: op != "module", lambda: _fsq_kernels_quantize("reference")),
    Provider(
        "torch.compile(fsq_kernels.FSQ)",
        lambda dev, op: op == "module" and _backend_available("cuda" if dev == "cuda" else "cpp", dev, op),
        lambda: _fsq_kernels_quantize("auto", compiled=True), compiled=True,
    ),
    Provider(VQP, _vqp_available, lambda: _vqp_functions(False)),
    Provider(VQP_COMPILED, _vqp_available, lambda: _vqp_functions(True), compiled=True),
]


def available_providers(device: str, include_compiled: bool = True, op: str = "quantize") -> list[Provider]:
    return [p for p in PROVIDERS if p.available(device, op) and (include_compiled or not p.compiled)]


def _codes(result):
    return result[0] if isinstance(result, tuple) else result


def build(provider_functions: tuple[Callable, Callable], case: Case) -> Callable[[], object]:
    """A zero-argument callable doing one `case.mode` of the provider on fresh inputs."""
    quantize, decode = provider_functions
    z = make_input(case)
    if case.mode == "forward":
        return lambda: quantize(z, case)
    if case.mode == "decode":
        if case.stages:
            raise ValueError("decode is benchmarked for FSQ, not ResidualFSQ")
        indices = fsq_kernels.quantize(z, case.levels, variant=VARIANT, channel_first=case.channel_first, backend="reference")[1]
        return lambda: decode(indices, case)
    z = z.requires_grad_(True)
    grad = torch.ones_like(z)
    if case.mode == "forward+backward":
        def forward_backward():
            z.grad = None
            _codes(quantize(z, case)).backward(grad)
        return forward_backward
    codes = _codes(quantize(z, case))

    def backward():
        z.grad = None
        codes.backward(grad, retain_graph=True)
    return backward


def build_floor(case: Case) -> Callable[[], object]:
    """The floor: one allocating torch.tanh over the same tensor (CPU); a device copy (CUDA)."""
    z = make_input(case)
    if case.device == "cuda":
        return lambda: z.clone()
    return lambda: torch.tanh(z)


def bench_sizes(max_log2: int) -> list[int]:
    return [2**k for k in range(10, max_log2 + 1, 4)]


def ci_mode() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
