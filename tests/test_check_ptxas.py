"""scripts/check_ptxas.py, the build's spill gate, on a synthetic ptxas -v log (no nvcc needed)."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("check_ptxas", os.path.join(ROOT, "scripts", "check_ptxas.py"))
check_ptxas = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_ptxas)


def _entry(mangled: str, arch: str, regs: int, spill_stores: int = 0, spill_loads: int = 0) -> str:
    return (f"ptxas info    : Compiling entry function '{mangled}' for '{arch}'\n"
            f"ptxas info    : Function properties for {mangled}\n"
            f"    0 bytes stack frame, {spill_stores} bytes spill stores, {spill_loads} bytes spill loads\n"
            f"ptxas info    : Used {regs} registers, used 1 barriers, 4096 bytes cmem[0]\n")


FORWARD_BF16 = "_ZN49_GLOBAL__N__56bc7f89_11_fsq_cuda_cu_95e15d4e_403618fsq_forward_kernelIN3c108BFloat16EEEvNS0_8CudaArgsEPKT_PS5_Pv"
USAGE_SHARED = "_ZN49_GLOBAL__N__56bc7f89_11_fsq_cuda_cu_95e15d4e_335023accumulate_usage_kernelIlLb1EEEvPKT_lllPy"
USAGE_GLOBAL = "_ZN49_GLOBAL__N__56bc7f89_11_fsq_cuda_cu_95e15d4e_335023accumulate_usage_kernelIlLb0EEEvPKT_lllPy"


def test_parse_names_registers_and_spills():
    log = _entry(FORWARD_BF16, "sm_90", 128) + _entry(USAGE_SHARED, "sm_90", 24) + _entry(USAGE_GLOBAL, "sm_90", 22, 8, 8)
    records = {r["kernel"]: r for r in check_ptxas.parse(log)}
    assert set(records) == {"fsq_forward_kernel<bfloat16>", "accumulate_usage_kernel<int64, shared>",
                            "accumulate_usage_kernel<int64>"}
    assert records["fsq_forward_kernel<bfloat16>"]["registers"] == 128
    assert records["accumulate_usage_kernel<int64>"]["spill_stores"] == 8


def test_exit_status(tmp_path, capsys):
    clean = tmp_path / "clean.log"
    clean.write_text(_entry(FORWARD_BF16, "sm_80", 128))
    spilling = tmp_path / "spilling.log"
    spilling.write_text(_entry(FORWARD_BF16, "sm_80", 255, 16, 16))
    empty = tmp_path / "empty.log"
    empty.write_text("no kernels here\n")
    assert check_ptxas.main([str(clean)]) == 0
    assert check_ptxas.main([str(spilling)]) == 1
    assert "SPILLS" in capsys.readouterr().out
    assert check_ptxas.main([str(empty)]) == 1
    assert check_ptxas.main([str(empty), "--allow-empty"]) == 0
