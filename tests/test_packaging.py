"""Packaging: setup.py needs torch only to build the extension (and says so clearly), the sdist
builds under default isolation and holds every csrc file, and an install from it works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(extra)
    return env


def _setup_py_without_torch(*argv, cwd=ROOT):
    """Run setup.py with `import torch` failing, as in pip's isolated build environment."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', *{list(argv)!r}]; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=120)


def test_setup_py_runs_without_torch():
    proc = _setup_py_without_torch("--name")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "fsq-kernels"


def test_building_the_extension_without_torch_says_what_to_do(tmp_path):
    proc = _setup_py_without_torch("build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out, out
    for needle in ("needs PyTorch", "isolated environment", "pip install torch", '"setuptools>=77" wheel ninja',
                   "--no-build-isolation", "FSQ_KERNELS_NO_EXTENSION=1"):
        assert needle in out, (needle, out)


def test_arch_lists_release_default_and_ci_pin():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    release = re.search(r'RELEASE_ARCH_LIST = "([^"]+)"', setup).group(1)
    assert release.split(";") == ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0+PTX"]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert 'export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"' in ci  # two archs keep CI's CUDA build short


def test_core_package_imports_without_numpy():
    code = ("import sys; sys.modules['numpy'] = None; import torch, fsq_kernels; "
            "print(fsq_kernels.quantize(torch.zeros(2, 4), [8, 5, 5, 5])[1].tolist())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_clean_env(PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[500, 500]"


def test_py_typed_is_package_data():
    assert os.path.exists(os.path.join(ROOT, "fsq_kernels", "py.typed"))
    assert 'fsq_kernels = ["py.typed"]' in open(os.path.join(ROOT, "pyproject.toml")).read()


@pytest.mark.slow
def test_sdist_builds_isolated_and_installs_into_a_fresh_venv(tmp_path):
    """`python -m build --sdist` under default isolation (no torch there); every csrc file is in
    it; a venv that sees torch (--system-site-packages) installs it with the CPU kernels and
    passes `python -m fsq_kernels check --quick`."""
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), ROOT],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = dist.glob("fsq_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    shipped = sorted(n.split("/", 2)[2] for n in names if n.startswith(f"{top}/csrc/") and n.count("/") == 2)
    print("csrc files in the sdist:", shipped)
    assert shipped == sorted(f for f in os.listdir(os.path.join(ROOT, "csrc")) if not f.startswith("."))
    assert f"{top}/fsq_kernels/py.typed" in names
    assert not any(n.endswith((".so", "_build_info.py")) for n in names)

    venv = tmp_path / "venv"
    # without its own pip/setuptools: the system's (setuptools >= 77, wheel, ninja, torch) are seen
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    env = _clean_env(FSQ_KERNELS_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", str(sdist)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    proc = subprocess.run([python, "-m", "fsq_kernels", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["package"]["path"].startswith(str(venv)), info["package"]
    assert os.path.exists(os.path.join(info["package"]["path"], "py.typed"))
    assert info["extension"]["state"] == "loaded" and info["extension"]["build"]["with_cuda"] is False
    assert info["auto"]["cpu"] == "cpp"

    proc = subprocess.run([python, "-m", "fsq_kernels", "check", "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: every backend matches the reference" in proc.stdout
