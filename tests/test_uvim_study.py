"""UViM end to end at tiny settings: `fsq-train uvim` (both stages on the runner, evaluation, grid,
resume) and `fsq-train uvim-study` (every task x quantizer, CSV / markdown / plot, reuse)."""

from __future__ import annotations

import csv
import json
import os

import pytest

from fsq_kernels.train.cli import main
from fsq_kernels.train.uvim_eval import SOURCES
from fsq_kernels.train.uvim_study import CSV_COLUMNS


@pytest.mark.slow
def test_uvim_command_trains_both_stages_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    args = ["uvim", "--task", "panoptic", "--out", out, "--preset", "tiny", "--quantizer", "vq"]
    assert main(args) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["task"] == "panoptic" and m["quantizer"] == "vq" and m["metric"] == "pq"
    assert set(m["results"]) == set(SOURCES)
    for r in m["results"].values():
        assert 0.0 <= r["pq"] <= 1.0 and r["stderr"] >= 0.0
    assert set(m["comparisons"]) == {"predicted_vs_none", "predicted_vs_shuffled", "predicted_vs_oracle"}
    assert m["usage_tokens"] == 32 * 16 and 0 < m["codebook_usage"] <= 1
    assert m["lm"]["perplexity"] > 1 and 0 <= m["lm"]["code_accuracy"] <= 1
    for stage in ("stage1", "lm"):
        assert any(f.startswith("ckpt_") for f in os.listdir(os.path.join(out, stage)))
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0
    assert main(args) == 1  # an existing run is not overwritten without --resume
    assert main(args + ["--resume"]) == 0  # a finished run resumes to the same evaluation
    with open(os.path.join(out, "metrics.json")) as f:
        again = json.load(f)
    assert again["results"] == m["results"]


@pytest.mark.slow
def test_tiny_uvim_study_runs_and_reuses_models(tmp_path, capsys):
    out = str(tmp_path / "study")
    assert main(["uvim-study", "--out", out, "--tiny"]) == 0
    with open(os.path.join(out, "uvim.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert {r["task"] for r in rows} == {"depth", "colorization", "panoptic"}
    assert {r["quantizer"] for r in rows} == {"fsq", "vq-uvim"}
    assert {r["code_source"] for r in rows} == set(SOURCES)
    ranked = {("depth", "rmse"), ("colorization", "colour_fd"), ("panoptic", "pq")}
    assert {(r["task"], r["metric"]) for r in rows if r["stderr"]} == ranked
    assert len([r for r in rows if r["stderr"]]) == 3 * 2 * len(SOURCES)
    md = open(os.path.join(out, "uvim.md")).read()
    assert "VQ as UViM" in md and "claims" in md and "| fsq |" in md
    assert os.path.getsize(os.path.join(out, "uvim.png")) > 0
    models = os.listdir(os.path.join(out, "models"))
    assert len(models) == 6
    stamp = {d: os.path.getmtime(os.path.join(out, "models", d, "metrics.json")) for d in models}
    capsys.readouterr()
    assert main(["uvim-study", "--out", out, "--tiny"]) == 0  # a rerun reuses every finished model
    assert capsys.readouterr().out.count("reused") == 6
    assert stamp == {d: os.path.getmtime(os.path.join(out, "models", d, "metrics.json")) for d in models}
