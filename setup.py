"""Build of the optional C++/CUDA extension `fsq_kernels._C` (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .                  # CPU + CUDA kernels when possible
    FSQ_KERNELS_NO_CUDA=1 pip install --no-build-isolation -e .       # CPU kernels only
    FSQ_KERNELS_NO_EXTENSION=1 pip install --no-build-isolation -e .  # pure Python

CUDA kernels are built when torch is a CUDA build and nvcc is found (CUDA_HOME, default
/usr/local/cuda). Without a visible GPU TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX".
MAX_JOBS limits ninja's parallelism (torch.utils.cpp_extension reads it).
"""
import glob
import os
import shutil
import site
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extensions():
    if _truthy("FSQ_KERNELS_NO_EXTENSION"):
        return [], {}
    # before torch.utils.cpp_extension is imported: it resolves CUDA_HOME at import time (and
    # would pick /usr/local from an nvcc symlink in /usr/local/bin)
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    nvcc = None
    if os.environ.get("CUDA_HOME"):
        cand = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    nvcc = nvcc or shutil.which("nvcc")
    with_cuda = (torch.version.cuda is not None and nvcc is not None
                 and cpp_extension.CUDA_HOME is not None and not _truthy("FSQ_KERNELS_NO_CUDA"))

    sources = ["csrc/fsq_ops.cpp", "csrc/fsq_cpu.cpp"]
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math",
           "-fvisibility=hidden"]
    macros = []
    ldflags = ["-fopenmp"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # A100, H100 (+ PTX of sm_90, so newer GPUs can JIT the kernels)
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources.append("csrc/fsq_cuda.cu")
        macros.append(("FSQ_WITH_CUDA", "1"))
        include_dirs += _nvidia_include_dirs()
        extra["nvcc"] = ["-O3", "-std=c++20", "-Xptxas", "-v",
                         "-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="fsq_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=ldflags,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
