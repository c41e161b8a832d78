"""Backend registry and choice: which backend runs a call, decided without touching tensor data.

Every backend module is imported once, when fsq_kernels.ops is imported, and what it can do is
recorded in plain dicts. Choosing a backend for a call is then a few dict and attribute lookups
on the tensor's device and dtype: nothing is imported and nothing is read from the device, so
torch.compile(fullgraph=True) and torch.export trace straight through it.

A backend module exposes `is_available(device_type)`, `supports(levels)`, `quantize`,
`indices_to_codes` and optionally `residual_quantize` and `quantize_train` (docs/design.md,
"Backends").
"""

from __future__ import annotations

import os
import types

import torch

from . import _reference

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
OPS = ("quantize", "indices_to_codes", "residual_quantize", "quantize_train")
# float64 runs where its math can be float64: the reference and the CPU kernels.
FLOAT64_BACKENDS = ("reference", "cpp")
# `auto` tries these in order per device type, then falls back to the reference.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}


def _triton_may_run() -> bool:
    # Importing the Triton op layer costs ~2 s; without a GPU it only runs under the interpreter.
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _import_fused() -> dict[str, types.ModuleType | None]:
    from . import native  # the extension's loader decides (and warns) if _C cannot be used

    triton_module = None
    if _triton_may_run():
        try:
            from . import triton as triton_module
        except ImportError:  # triton not installed
            triton_module = None
    return {"cpp": native, "cuda": native, "triton": triton_module}


_DEVICE_OF = {"reference": None, "cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu")}


def _scan() -> tuple[dict, dict]:
    """(module of each backend name, {(name, device_type): set of ops it runs there})."""
    modules = {"reference": _reference, **_import_fused()}
    runs = {}
    for name, module in modules.items():
        if module is None:
            continue
        for device_type in ("cpu", "cuda"):
            if _DEVICE_OF[name] is not None and device_type not in _DEVICE_OF[name]:
                continue
            if name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            if module.is_available(device_type):
                runs[(name, device_type)] = frozenset(op for op in OPS if hasattr(module, op))
    return modules, runs


_MODULES, _RUNS = _scan()


def module(name: str) -> types.ModuleType:
    return _MODULES[name]


def runs_on(name: str, device_type: str, op: str = "quantize") -> bool:
    if name == "reference":
        return True
    return op in _RUNS.get((name, device_type), ())


def available_backends(op: str = "quantize") -> list[str]:
    """`reference` always; `cpp` when the extension is built; `cuda` when it is built with kernels
    for the visible GPU; `triton` when a GPU is visible or TRITON_INTERPRET=1 is set. `op`
    ("quantize", "indices_to_codes", "residual_quantize" or "quantize_train") narrows the list to the backends that
    implement it."""
    if op not in OPS:
        raise ValueError(f"available_backends: op must be one of {list(OPS)}; got {op!r}")
    names = ["reference"]
    for name, device_type in (("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cuda"), ("triton", "cpu")):
        if name not in names and runs_on(name, device_type, op):
            names.append(name)
    return names


def resolve(backend: str, device: torch.device, dtype: torch.dtype, levels: tuple[int, ...], caller: str,
            op: str = "quantize") -> types.ModuleType:
    """The backend module that runs `op` for a tensor on `device` whose math dtype is `dtype`.

    `auto`: on CUDA, cuda then triton; on CPU, cpp; otherwise, or where the first choice cannot
    take the level set or float64, the reference. A backend asked for by name is never replaced:
    it runs or the call raises."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {list(BACKENDS)}; got {backend!r}")
    device_type = device.type
    if backend == "auto":
        if dtype == torch.float64:
            candidates = ("cpp",) if device_type == "cpu" else ()
        else:
            candidates = AUTO_ORDER.get(device_type, ())
        for name in candidates:
            if runs_on(name, device_type, op) and _MODULES[name].supports(levels):
                return _MODULES[name]
        return _reference
    if backend != "reference":
        if not runs_on(backend, device_type):
            raise ValueError(
                f"{caller}: backend {backend!r} is not available for a tensor on device {str(device)!r}; "
                f"available backends: {available_backends()}"
            )
        if not runs_on(backend, device_type, op):
            raise ValueError(f"{caller}: backend {backend!r} does not implement {op} yet; use backend='auto' or 'reference'")
        if dtype == torch.float64 and backend not in FLOAT64_BACKENDS:
            raise TypeError(
                f"{caller}: backend {backend!r} supports float16, bfloat16 and float32 inputs; got torch.float64 "
                f"(use backend='reference' or 'cpp' for float64)"
            )
        if not _MODULES[backend].supports(levels):
            raise ValueError(
                f"{caller}: backend {backend!r} cannot run levels {list(levels)} (see docs/design.md, "
                f"'Backends', for each backend's limits); use backend='auto' or 'reference'"
            )
    return _MODULES[backend]
