"""`python -m fsq_kernels` (info, check, bench, --json) and the extension loader: a broken `_C`
warns with its error and `auto` reports the fallback; `cuda` is advertised only for a GPU whose
architecture the build holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fsq_kernels
from fsq_kernels import _extension, selfcheck
from fsq_kernels.ops import native

PACKAGE_DIR = os.path.dirname(os.path.abspath(fsq_kernels.__file__))

# Runs `python -m fsq_kernels ARGS` with the package found on sys.path only: an editable install's
# finder would otherwise hand out the checkout's `_C` when a copy of the package has none.
_RUN_MAIN = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
    "sys.argv = ['fsq_kernels'] + sys.argv[1:]; "
    "runpy.run_module('fsq_kernels', run_name='__main__', alter_sys=True)"
)


def _cli(*args, root=None, interpret=False, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    root = root or os.path.dirname(PACKAGE_DIR)
    env["PYTHONPATH"] = root
    return subprocess.run([sys.executable, "-c", _RUN_MAIN, *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_info_text_names_versions_build_and_every_backend(capsys):
    from fsq_kernels.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for needle in (f"fsq-kernels {fsq_kernels.__version__}", f"torch {torch.__version__}", "Extension:", "GPU:",
                   "reference", "cpp", "cuda", "triton", "backend='auto'", "Matching rule", "TRITON_INTERPRET"):
        assert needle in out, (needle, out)


def test_info_json_agrees_with_the_package(capsys):
    from fsq_kernels.__main__ import main

    assert main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["package"]["version"] == fsq_kernels.__version__
    assert info["torch"]["version"] == torch.__version__
    assert set(info["backends"]) == {"reference", "cpp", "cuda", "triton"}
    available = [name for name, b in info["backends"].items() if b["available"]]
    assert available == fsq_kernels.available_backends()
    assert info["auto"]["cpu"] in available
    assert info["extension"]["state"] in ("loaded", "not built", "failed")
    assert info["backends"]["cpp"]["available"] == (info["extension"]["state"] == "loaded")
    if not torch.cuda.is_available():
        assert info["gpus"] == [] and info["auto"]["cuda"] is None
        assert not info["backends"]["cuda"]["available"] and info["backends"]["cuda"]["why"]


def test_check_quick_passes_and_json_summarizes_every_backend():
    proc = _cli("check", "--device", "cpu", "--quick", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["failures"] == []
    groups = {(row["backend"], row["group"]) for row in report["summary"]}
    backends = {b for b, _ in groups}
    assert "reference" in backends
    if "cpp" in fsq_kernels.available_backends():
        assert {("cpp", g) for g in ("quantize+grad", "quantize", "decode", "residual", "empty")} <= groups
    assert all(row["failed"] == 0 and row["cases"] > 0 for row in report["summary"])


def test_check_text_table(capsys):
    from fsq_kernels.__main__ import main

    assert main(["check", "--quick", "--backend", "reference", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "in-window diffs" in out and "OK: every backend matches the reference" in out


def test_check_fails_on_a_wrong_backend(monkeypatch):
    """The check can fail: a backend whose codes are off is reported and the exit code is 1."""
    if "cpp" not in fsq_kernels.available_backends():
        pytest.skip("needs the cpp backend")
    right = native.quantize

    def off_by_half(z, *args, **kwargs):
        codes, indices = right(z, *args, **kwargs)
        return codes * 0.5, indices

    monkeypatch.setattr(native, "quantize", off_by_half)
    outcomes = selfcheck.run_check("cpu", quick=True, backends=["cpp"])
    failed = [o for o in outcomes if not o.ok]
    assert failed and {o.group for o in failed} >= {"quantize", "quantize+grad"}
    assert all(o.backend == "cpp" for o in failed)
    assert "code values differ" in failed[0].detail
    table = selfcheck.format_table(outcomes, "cpu", 0.0)
    assert "MISMATCH" in table and "FAIL cpp" in table

    from fsq_kernels.__main__ import main

    assert main(["check", "--quick", "--backend", "cpp"]) == 1


def test_check_and_bench_reject_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from fsq_kernels.__main__ import main

    assert main(["check", "--device", "cuda"]) == 2
    assert main(["bench", "--device", "cuda", "--quick"]) == 2


def test_bench_quick_reports_floor_and_reference(capsys):
    from fsq_kernels.__main__ import main

    assert main(["bench", "--device", "cpu", "--quick", "--tokens", "4096", "--backend", "cpp", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert {r["op"] for r in rows} == {"forward", "forward+backward", "decode", "residual x8"}
    assert {r["backend"] for r in rows} <= {"reference", "cpp"} and "reference" in {r["backend"] for r in rows}
    for r in rows:
        assert r["error"] is None, r
        assert r["ms"] > 0 and r["copy_gbps"] > 0 and r["x_floor"] > 0
    assert all(abs(r["vs_reference"] - 1) < 1e-9 for r in rows if r["backend"] == "reference")


# ---------------------------------------------------------------------------------------------
# The extension loader
# ---------------------------------------------------------------------------------------------


def _package_copy(tmp_path, binary: bytes | None):
    """A copy of the installed package whose `_C` is `binary` (None: no `_C` at all)."""
    root = tmp_path / "copy"
    shutil.copytree(PACKAGE_DIR, root / "fsq_kernels", ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    if binary is not None:
        (root / "fsq_kernels" / f"_C{_ext_suffix()}").write_bytes(binary)
    return str(root)


def _ext_suffix() -> str:
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX")


def test_broken_extension_warns_once_and_auto_falls_back(tmp_path):
    root = _package_copy(tmp_path, b"this is not a shared object\n")
    proc = _cli("--json", root=root)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    warning = proc.stderr
    assert warning.count("ExtensionLoadWarning") == 1, warning
    assert "exists but failed to load" in warning
    error = info["extension"]["error"]
    assert info["extension"]["state"] == "failed" and "ImportError" in error
    assert error.split(": ", 1)[1].splitlines()[0] in warning  # the loader's own error text
    assert f"this process runs torch {torch.__version__}" in warning
    assert "'reference' for CPU tensors" in warning and "pip install --no-build-isolation" in warning
    assert info["auto"]["cpu"] == "reference"
    assert not info["backends"]["cpp"]["available"]
    assert info["backends"]["cpp"]["why"].startswith("import error: ImportError")


def test_missing_extension_is_silent(tmp_path):
    root = _package_copy(tmp_path, None)
    proc = _cli("--json", root=root)
    assert proc.returncode == 0, proc.stderr
    assert "ExtensionLoadWarning" not in proc.stderr and "failed to load" not in proc.stderr
    info = json.loads(proc.stdout)
    assert info["extension"]["state"] == "not built" and info["auto"]["cpu"] == "reference"
    assert info["backends"]["cpp"]["why"].startswith("not built")


@pytest.mark.parametrize("sass,ptx,capability,runs", [
    (["8.0", "9.0"], ["9.0"], (7, 5), False),  # T4 on the old default list: no kernel
    (["8.0", "9.0"], ["9.0"], (8, 6), True),  # sm_80 SASS runs on sm_86
    (["8.0", "9.0"], ["9.0"], (8, 9), True),
    (["8.0", "9.0"], ["9.0"], (9, 0), True),
    (["8.0", "9.0"], ["9.0"], (12, 0), True),  # PTX JIT on newer GPUs
    (["8.0", "9.0"], [], (10, 0), False),  # SASS does not cross major versions
    (["8.6"], [], (8, 0), False),  # nor run on an older minor
    (["9.0a"], [], (9, 0), True),
    (["9.0a"], ["9.0a"], (10, 0), False),  # arch-specific code runs on its own arch only
    (["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"], ["12.0"], (7, 5), True),  # the release list
])
def test_arch_runs_on(sass, ptx, capability, runs):
    assert _extension.arch_runs_on(sass, ptx, capability) is runs


def test_cuda_is_advertised_only_for_a_compiled_arch(monkeypatch):
    if native._C is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(native, "with_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "build_info", lambda: {"sass": ["8.0", "9.0"], "ptx": ["9.0"],
                                                           "cuda_arch_list": "8.0;9.0+PTX"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not native.is_available("cuda")
    ok, why = _extension.cuda_arch_supported()
    assert not ok and "sm_75" in why and "TORCH_CUDA_ARCH_LIST" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert native.is_available("cuda")
    monkeypatch.setattr(_extension, "build_info", lambda: None)  # no record: cannot tell, keep it
    assert _extension.cuda_arch_supported((7, 5))[0]


def test_a_binary_for_another_python_counts_as_broken(tmp_path, monkeypatch):
    """`_C.cpython-3XX-....so` of another interpreter: not "not built" (that would be silent)."""
    other = "_C.cpython-399-x86_64-linux-gnu.so"
    (tmp_path / other).write_bytes(b"")
    (tmp_path / f"_C{_ext_suffix()}.bak").write_bytes(b"")  # not an extension name: ignored
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", str(tmp_path))
    assert [os.path.basename(p) for p in _extension._stray_binaries()] == [other]


def test_gpu_session_dry_run_prints_a_plan_within_its_limits(tmp_path):
    root = os.path.dirname(PACKAGE_DIR)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "gpu_session.sh"), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout
    head = plan.splitlines()[0]
    seconds = int(head.split("at most ")[1].split(" s")[0])
    files = int(head.split(", ")[2].split(" files")[0])
    assert seconds <= 360 and files <= 8, head
    for step in ("build", "tests", "check --device cuda", "bench --device cuda --tokens 16777216", "large",
                 "guard graph", "compile", "FSQ_TEST_DEVICE=cuda", "-n "):
        assert step in plan, (step, plan)
    assert not out.exists()  # a dry run writes nothing


def test_on_device_keeps_the_view_layout():
    from .conftest import on_device

    z = torch.randn(2, 5, 7, 4).permute(0, 3, 1, 2)[..., ::2]  # channel-first view of NHWC memory, sliced
    copy = on_device(z, "cpu")
    assert copy.stride() == z.stride() and copy.storage_offset() == z.storage_offset()
    assert torch.equal(copy, z) and copy.data_ptr() != z.data_ptr()
    if torch.cuda.is_available():
        on_gpu = on_device(z, "cuda")
        assert on_gpu.is_cuda and on_gpu.stride() == z.stride() and torch.equal(on_gpu.cpu(), z)
