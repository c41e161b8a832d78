"""Loading the compiled extension `fsq_kernels._C`, and what its build can run on.

Three states, told apart so that nothing falls back silently:

* not built (no `_C` file next to the package; a pure-Python install): silent, the `cpp` and
  `cuda` backends are simply absent;
* loaded;
* built but failing to load (typically an ABI mismatch after a torch upgrade): one
  ExtensionLoadWarning with the error, the build-time and run-time torch versions, what
  backend='auto' uses instead, and how to rebuild.

The build writes `fsq_kernels/_build_info.py` (setup.py): the torch and CUDA versions it compiled
against and the GPU architectures it holds kernels (SASS) or PTX for. `cuda_arch_supported` reads
it, so `cuda` is advertised only for a GPU the build can run on.
"""

from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import os
import re
import sysconfig
import warnings

import torch

__all__ = ["ExtensionLoadWarning", "build_info", "cuda_arch_supported", "load", "state"]

_PACKAGE = __name__.rpartition(".")[0]
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ExtensionLoadWarning(RuntimeWarning):
    """The extension exists but cannot be loaded; the fused CPU/CUDA kernels are unavailable."""


@functools.cache
def build_info() -> dict | None:
    """What setup.py recorded when it built the extension, or None (not built by setup.py, or
    built before the record existed)."""
    try:
        module = importlib.import_module(f"{_PACKAGE}._build_info")
    except ImportError:
        return None
    return dict(getattr(module, "BUILD_INFO", {})) or None


def _stray_binaries() -> list[str]:
    """`_C` binaries for another interpreter (e.g. cpython-312 while this is 3.11)."""
    own = sysconfig.get_config_var("EXT_SUFFIX") or ""
    return sorted(p for p in glob.glob(os.path.join(_PACKAGE_DIR, "_C.*")) if not p.endswith(own)
                  and p.endswith((".so", ".pyd")))


def _rebuild_hint() -> str:
    root = os.path.dirname(_PACKAGE_DIR)
    if os.path.exists(os.path.join(root, "setup.py")):  # a source checkout (editable install)
        return f"cd {root} && pip install --no-build-isolation --no-deps -e ."
    return "pip install --no-build-isolation --no-deps --force-reinstall fsq-kernels"


def _warning_text(path: str, error: str) -> str:
    info = build_info() or {}
    built = info.get("torch_version", "unknown (no build record)")
    if info.get("torch_cuda"):
        built += f" (CUDA {info['torch_cuda']})"
    running = torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    return (
        f"fsq_kernels: the compiled extension {path} exists but failed to load:\n"
        f"    {error}\n"
        f"It was built with torch {built}; this process runs torch {running}.\n"
        "Instead of the fused kernels, backend='auto' now uses 'reference' for CPU tensors (in place "
        "of 'cpp') and 'triton' where it runs, else 'reference', for CUDA tensors (in place of 'cuda').\n"
        f"Rebuild the extension against this torch: {_rebuild_hint()}\n"
        "`python -m fsq_kernels` shows the state of every backend."
    )


@functools.cache
def load():
    """(the `_C` module, None) when it loads; (None, None) when it is not built; (None, error
    text) when it exists but fails, after warning once."""
    name = f"{_PACKAGE}._C"
    spec = importlib.util.find_spec(name)
    if spec is None:
        stray = _stray_binaries()
        if not stray:
            return None, None
        error = (f"it was built for another Python ({os.path.basename(stray[0])}); this interpreter loads "
                 f"'_C{sysconfig.get_config_var('EXT_SUFFIX')}'")
        path = stray[0]
    else:
        try:
            return importlib.import_module(name), None
        except Exception as exc:  # ImportError/OSError for ABI mismatches, RuntimeError from op registration
            error = f"{type(exc).__name__}: {exc}"
            path = spec.origin or name
    warnings.warn(_warning_text(path, error), ExtensionLoadWarning, stacklevel=2)
    return None, error


def state() -> tuple[str, str | None]:
    """("loaded" | "not built" | "failed", the error text when failed)."""
    module, error = load()
    if module is not None:
        return "loaded", None
    return ("failed", error) if error else ("not built", None)


# ---------------------------------------------------------------------------------------------
# Which GPUs the build can run on
# ---------------------------------------------------------------------------------------------

_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)$")


def _parse(arch: str) -> tuple[int, int, str]:
    match = _ARCH.match(arch.strip())
    if not match:
        raise ValueError(f"architecture {arch!r} is not of the form MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2)), match.group(3)


def arch_runs_on(sass: list[str], ptx: list[str], capability: tuple[int, int]) -> bool:
    """Whether a binary with SASS for `sass` and PTX for `ptx` ("8.0", "9.0a", ...) runs on a
    GPU of `capability`: SASS runs on the same major version at an equal or higher minor one
    (an "a" arch only on itself); PTX is JIT-compiled for any equal or newer GPU."""
    for arch in sass:
        major, minor, suffix = _parse(arch)
        if (suffix == "a" and (major, minor) == capability) or (
                suffix != "a" and major == capability[0] and minor <= capability[1]):
            return True
    for arch in ptx:
        major, minor, suffix = _parse(arch)
        if (major, minor) == capability or (suffix != "a" and (major, minor) <= capability):
            return True
    return False


def cuda_arch_supported(capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """(whether the extension's CUDA kernels run on the GPU of `capability` — the current device
    when None — and why). Without a build record the answer is yes, unknown: the build may hold
    anything (e.g. a CMake build)."""
    if capability is None:
        if not torch.cuda.is_available():
            return False, "no GPU visible"
        capability = torch.cuda.get_device_capability()
    capability = tuple(capability)
    info = build_info()
    if not info or "sass" not in info:
        return True, "architectures unknown (no build record); assuming the build covers this GPU"
    sass, ptx = list(info.get("sass", [])), list(info.get("ptx", []))
    built = ", ".join([f"sm_{a.replace('.', '')}" for a in sass] + [f"PTX compute_{a.replace('.', '')}" for a in ptx])
    gpu = f"sm_{capability[0]}{capability[1]}"
    if arch_runs_on(sass, ptx, capability):
        return True, f"{gpu} runs the build ({built})"
    return False, (f"arch not compiled: the build holds {built or 'no GPU code'}, the GPU is {gpu}; rebuild with "
                   f"TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" added")
