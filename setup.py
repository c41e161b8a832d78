"""Build of the optional C++/CUDA extension `fsq_kernels._C` (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .                  # CPU + CUDA kernels when possible
    FSQ_KERNELS_NO_CUDA=1 pip install --no-build-isolation -e .       # CPU kernels only
    FSQ_KERNELS_NO_EXTENSION=1 pip install -e .                       # pure Python

The extension is compiled against the torch that is installed, so it needs torch in the build
environment: build with --no-build-isolation (pip's isolated environment has no torch). Nothing
else needs torch: this file does not import it until the extension is built, so an sdist or the
package metadata build under default isolation.

CUDA kernels are built when torch is a CUDA build and nvcc is found (CUDA_HOME, default
/usr/local/cuda). TORCH_CUDA_ARCH_LIST picks the GPU architectures; when it is unset, torch
builds for the visible GPU, and with no GPU visible the release list RELEASE_ARCH_LIST below
(common data-center and consumer GPUs, + PTX of the newest for later ones) is used.
MAX_JOBS limits ninja's parallelism (torch.utils.cpp_extension reads it).

The build writes fsq_kernels/_build_info.py next to the extension: the torch and CUDA versions
and the architectures compiled (`python -m fsq_kernels` prints them; the `cuda` backend is
advertised only for a GPU those architectures run on).
"""
import datetime
import glob
import os
import platform
import re
import shutil
import site
import subprocess
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
# T4, A100, A10/RTX 30xx, L4/RTX 40xx, H100/H200, B200, RTX 50xx; + PTX of sm_120 for newer GPUs
RELEASE_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
SOURCES = ["csrc/fsq_ops.cpp", "csrc/fsq_cpu.cpp", "csrc/fsq_cpu_residual.cpp", "csrc/fsq_usage.cpp"]
CUDA_SOURCES = ["csrc/fsq_cuda.cu"]

NO_TORCH = """
fsq-kernels: building the C++/CUDA extension needs PyTorch, and `import torch` failed here:
    {error}

The extension is compiled against the torch you run it with, so pip must not build it in an
isolated environment (a fresh one has no torch, or a different one). Install torch and the
build requirements first, then build without isolation:

    pip install torch "setuptools>=77" wheel ninja
    pip install --no-build-isolation fsq-kernels        # from a checkout: pip install --no-build-isolation -e .

For the pure-Python package (reference backend only), set FSQ_KERNELS_NO_EXTENSION=1.
"""


def _truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _nvidia_include_dirs():
    """site-packages/nvidia/cu13/include (cuBLAS/cuSPARSE headers that torch's CUDA headers use)."""
    roots = set(site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]])
    dirs = []
    for root in sorted(roots):
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _compiled_archs(cpp_extension):
    """(SASS archs, PTX archs) as "8.0"-style strings, from the -gencode flags torch will pass."""
    flags = cpp_extension._get_cuda_arch_flags()
    sass, ptx = [], []
    for kind, number, suffix in re.findall(r"code=(sm|compute)_(\d+)([af]?)", " ".join(flags)):
        arch = f"{number[:-1]}.{number[-1]}{suffix}"
        target = sass if kind == "sm" else ptx
        if arch not in target:
            target.append(arch)
    return sass, ptx


def _configure(ext):
    """Fill in `ext` for the installed torch; returns (torch's build_ext class, build record).
    The only place that imports torch."""
    # before torch.utils.cpp_extension is imported: it resolves CUDA_HOME at import time (and
    # would pick /usr/local from an nvcc symlink in /usr/local/bin)
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(NO_TORCH.format(error=f"{type(exc).__name__}: {exc}")) from None

    nvcc = None
    if os.environ.get("CUDA_HOME"):
        cand = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    nvcc = nvcc or shutil.which("nvcc")
    with_cuda = (torch.version.cuda is not None and nvcc is not None
                 and cpp_extension.CUDA_HOME is not None and not _truthy("FSQ_KERNELS_NO_CUDA"))

    sources = list(SOURCES)
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math",
           "-fvisibility=hidden"]
    macros = []
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    info = {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda, "with_cuda": with_cuda,
            "nvcc_version": None, "cuda_arch_list": None, "sass": [], "ptx": []}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = RELEASE_ARCH_LIST
        sources += CUDA_SOURCES
        macros.append(("FSQ_WITH_CUDA", "1"))
        include_dirs += _nvidia_include_dirs()
        extra["nvcc"] = ["-O3", "-std=c++20", "-Xptxas", "-v",
                         "-lineinfo", "--expt-relaxed-constexpr"]
        factory = cpp_extension.CUDAExtension
        info["nvcc_version"] = _nvcc_version(nvcc)
        info["sass"], info["ptx"] = _compiled_archs(cpp_extension)
        info["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs"
    else:
        factory = cpp_extension.CppExtension
    configured = factory(name=ext.name, sources=sources, include_dirs=include_dirs, define_macros=macros,
                         extra_compile_args=extra, extra_link_args=["-fopenmp"])
    for attr in ("sources", "include_dirs", "define_macros", "undef_macros", "library_dirs", "libraries",
                 "runtime_library_dirs", "extra_objects", "extra_compile_args", "extra_link_args", "language"):
        setattr(ext, attr, getattr(configured, attr))
    return cpp_extension.BuildExtension.with_options(use_ninja=True), info


def _write_build_info(path, info):
    info = dict(info, python=platform.python_version(),
                built_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('"""Written by setup.py when it built fsq_kernels._C; read by fsq_kernels._extension."""\n\n')
        f.write(f"BUILD_INFO = {info!r}\n")


class TorchBuildExt(build_ext):
    """setuptools' build_ext until it runs; then torch's BuildExtension, configured for the
    installed torch. sdist and metadata builds never get here, so they need no torch."""

    def run(self):
        (ext,) = self.extensions
        torch_build_ext, info = _configure(ext)
        build_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
        _write_build_info(os.path.join(build_dir, "_build_info.py"), info)
        cmd = torch_build_ext(self.distribution)
        torch_options = {key: cmd.__dict__[key] for key in ("no_python_abi_suffix", "use_ninja")}
        cmd.__dict__.update(self.__dict__)  # this command's finalized options (inplace, build_lib, ...)
        cmd.__dict__.update(torch_options)
        if cmd.use_ninja:
            cmd.force = True  # what BuildExtension.finalize_options adds
        cmd.run()


def extension():
    """The extension as setup() gets it: configured only when built (TorchBuildExt.run)."""
    return Extension("fsq_kernels._C", sources=list(SOURCES))


if __name__ == "__main__":  # pip and `python setup.py` run it so; scripts/gpu_session_checks.py imports it
    setup(ext_modules=[] if _truthy("FSQ_KERNELS_NO_EXTENSION") else [extension()],
          cmdclass={"build_ext": TorchBuildExt})
