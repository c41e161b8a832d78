"""The training package reproduces, bit for bit, what main trained before it was restructured:
the tiny preset, 20 steps per stage, compared tensor by tensor with tests/golden/tiny20.json."""

from __future__ import annotations

import json

import pytest

from tests.golden.golden_run import GOLDEN, machine, run


def test_tiny_run_matches_pre_restructure_golden(tmp_path):
    with open(GOLDEN) as f:
        golden = json.load(f)
    if golden["machine"] != machine():
        pytest.skip(f"golden taken on {golden['machine']}; this machine is {machine()} (CPU rounding may differ)")
    now = run(workdir=str(tmp_path), pinned=True)  # cpu, cpp kernels: what 'auto' chose before
    for stage in ("tokenizer", "maskgit"):
        want, got = golden[stage], now[stage]
        assert sorted(got) == sorted(want), f"{stage}: checkpoint entries differ: {sorted(set(got) ^ set(want))[:8]}"
        differ = [k for k in want if got[k] != want[k]]
        assert not differ, f"{stage}: {len(differ)} of {len(want)} entries differ from the golden, e.g. {differ[:8]}"
