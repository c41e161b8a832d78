"""`python -m fsq_kernels` (info): versions, the CPU and GPU, how the extension was built, and
each backend: available, or why not.

Availability itself comes from the package (`available_backends` and the op layer's backend
choice); this module only explains it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import textwrap

import torch

from . import __version__, _extension, available_backends
from .matching import RULE

__all__ = ["auto_choice", "backends_on", "collect", "format_info"]

FUSED = ("cpp", "cuda", "triton")
_HOME_DEVICE = {"cpp": ("cpu",), "cuda": ("cuda",), "reference": ("cpu", "cuda")}


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton_devices() -> tuple[str, ...]:
    if torch.cuda.is_available():
        return ("cuda",)
    return ("cpu",) if os.environ.get("TRITON_INTERPRET") == "1" else ()


def backends_on(device_type: str, op: str = "quantize") -> list[str]:
    """The available backends that run `op` on tensors of `device_type`, reference first."""
    try:
        from .ops import backends as registry
    except ImportError:  # an op layer without the registry module
        registry = None
    names = []
    for name in available_backends(op):
        if registry is not None and hasattr(registry, "runs_on"):
            runs = registry.runs_on(name, device_type, op)
        else:
            runs = device_type in (_triton_devices() if name == "triton" else _HOME_DEVICE[name])
        if runs:
            names.append(name)
    return names


def auto_choice(device_type: str, dtype: torch.dtype = torch.float32, levels=(8, 5, 5, 5)) -> str | None:
    """The backend backend='auto' runs for a `device_type` tensor of `dtype` (None: no such device)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return None
    try:
        from .ops import backends as registry
    except ImportError:  # an op layer that resolves by name
        from . import ops

        return ops._resolve_backend("auto", torch.empty(0, device=device_type, dtype=dtype), "python -m fsq_kernels")
    module = registry.resolve("auto", torch.device(device_type), dtype, tuple(levels), "python -m fsq_kernels")
    for name in ("reference", *FUSED):
        if device_type in (_triton_devices() if name == "triton" else _HOME_DEVICE[name]) and \
                registry.module(name) is module:
            return name
    return "unknown"


def _cpu() -> dict:
    machine = platform.machine().lower()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    x86 = machine in ("x86_64", "amd64")
    avx2 = x86 and {"avx2", "fma"} <= flags
    return {
        "machine": machine,
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        # csrc/fsq_cpu.cpp picks its AVX2+FMA cores at run time with the same test
        "cpp_path": "AVX2+FMA" if avx2 else ("generic" if x86 or machine else "unknown"),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1)})
    return out


def _extension_reason(state: str, error: str | None) -> str:
    if state == "not built":
        return "not built (pure-Python install; build with pip install --no-build-isolation)"
    return f"import error: {error}"


def _why(name: str, available: list[str], state: str, error: str | None) -> str:
    """Why `name` is (or is not) available, in words."""
    if name == "reference":
        return "pure PyTorch, runs anywhere"
    if name == "triton":
        if _triton_version() is None:
            return "triton not installed"
        if torch.cuda.is_available():
            return "CUDA tensors" if name in available else "triton installed, but its op layer did not load"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "CPU tensors in the Triton interpreter (TRITON_INTERPRET=1; slow)"
        return "no GPU visible (TRITON_INTERPRET=1 runs it on CPU tensors, slowly)"
    if state != "loaded":
        return _extension_reason(state, error)
    if name == "cpp":
        return "CPU tensors (extension loaded)"
    info = _extension.build_info() or {}
    from .ops import native

    if not native.with_cuda():
        return "built without CUDA"
    if not torch.cuda.is_available():
        return "no GPU visible"
    ok, why = _extension.cuda_arch_supported()
    return f"CUDA tensors; {why}" if ok else why + (f" (built for {info.get('cuda_arch_list')})" if info else "")


def collect() -> dict:
    """Everything `python -m fsq_kernels` prints, as a dict (the --json output)."""
    state, error = _extension.state()
    available = available_backends()
    backends = {name: {"available": name in available, "why": _why(name, available, state, error)}
                for name in ("reference", *FUSED)}
    return {
        "package": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda},
        "triton": _triton_version(),
        "cpu": _cpu(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "extension": {"state": state, "error": error, "build": _extension.build_info()},
        "gpus": _gpus(),
        "backends": backends,
        "auto": {"cpu": auto_choice("cpu"), "cuda": auto_choice("cuda")},
        "matching_rule": RULE,
    }


def _build_line(ext: dict) -> str:
    build = ext["build"]
    if ext["state"] == "not built":
        return "not built (reference backend only)"
    head = "loaded" if ext["state"] == "loaded" else f"FAILED TO LOAD: {ext['error']}"
    if not build:
        return head + "; no build record (built before it existed, or not by setup.py)"
    text = f"{head}; built {build.get('built_at', '?')} with torch {build['torch_version']}"
    if build.get("with_cuda"):
        archs = [f"sm_{a.replace('.', '')}" for a in build["sass"]] + [f"PTX {a}" for a in build["ptx"]]
        text += f", CUDA {build.get('nvcc_version') or build.get('torch_cuda')}, archs {' '.join(archs)}"
        text += f" (TORCH_CUDA_ARCH_LIST={build.get('cuda_arch_list')})"
    else:
        text += ", CPU kernels only"
    return text


def format_info(info: dict) -> str:
    cpu, gpus = info["cpu"], info["gpus"]
    torch_line = info["torch"]["version"] + (f" (CUDA {info['torch']['cuda']})" if info["torch"]["cuda"] else " (CPU)")
    lines = [
        f"fsq-kernels {info['package']['version']}  ({info['package']['path']})",
        f"Python {info['python']}, torch {torch_line}, triton {info['triton'] or 'not installed'}",
        f"CPU: {cpu['machine']}, torch ISA {cpu['torch_isa']}, cpp kernels use the {cpu['cpp_path']} path, "
        f"{cpu['threads']} threads (OMP_NUM_THREADS={cpu['omp_num_threads'] or 'unset'}), "
        f"TRITON_INTERPRET={info['triton_interpret'] or 'unset'}",
        f"Extension: {_build_line(info['extension'])}",
        "GPU: " + ("; ".join(f"cuda:{g['index']} {g['name']} (sm_{g['capability'].replace('.', '')}, "
                             f"{g['memory_gib']} GiB)" for g in gpus) if gpus else "none visible"),
        "Backends:",
    ]
    for name, b in info["backends"].items():
        lines.append(f"  {name:<10} {'yes' if b['available'] else 'no':<4} {b['why']}")
    auto = info["auto"]
    lines.append(f"backend='auto': CPU tensors -> {auto['cpu']}; CUDA tensors -> {auto['cuda'] or 'n/a (no GPU)'}")
    lines += textwrap.wrap(f"Matching rule of `check`: {info['matching_rule']}", width=100, subsequent_indent="  ")
    lines.append("Next: python -m fsq_kernels check [--device cpu|cuda] [--quick]; python -m fsq_kernels bench")
    return "\n".join(lines)
