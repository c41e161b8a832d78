"""A resume you can trust: config and seed from the checkpoint, conflicting flags refused by name,
a larger step budget with the cosine re-derived, metrics.jsonl trimmed to the resumed step, and
checkpoints of the pre-package format (1) resumed and exported."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fsq_kernels.models import FSQTokenizer
from fsq_kernels.train import lr_factor
from fsq_kernels.train.cli import main

# Pinned backend and device; a 4-step tiny run with checkpoints at 2 and 4.
RUN = ["--preset", "tiny", "--seed", "5", "--steps", "4", "--device", "cpu", "--set", "fsq_backend=cpp",
       "--set", "ckpt_every=2", "--set", "keep_ckpts=5", "--set", "eval_every=100"]


def _ckpt(d, step):
    return torch.load(os.path.join(d, f"ckpt_{step:08d}.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "tok")
    assert main(["tokenizer", *RUN, "--out", out]) == 0
    return out


def test_resume_without_flags_more_steps_trimmed_metrics(run4, tmp_path, capsys):
    out = str(tmp_path / "tok")
    shutil.copytree(run4, out)
    # a crash after step 4 was logged but before its checkpoint: metrics.jsonl runs ahead of ckpt 2
    os.remove(os.path.join(out, "ckpt_00000004.pt"))
    capsys.readouterr()
    assert main(["tokenizer", "--out", out, "--resume", "--steps", "6"]) == 0  # nothing else repeated
    assert "resumed tokenizer" in capsys.readouterr().err
    ck = _ckpt(out, 6)
    cfg = ck["config"]
    assert ck["seed"] == 5 and cfg["seed"] == 5 and ck["preset"] == "tiny"
    assert cfg["tok_channels"] == 8 and cfg["fsq_backend"] == "cpp" and cfg["tok_steps"] == 6
    # the cosine now ends at step 6: the LR after the last step is the schedule's floor there
    assert ck["scheduler"]["lr_lambdas"][0]["total"] == 6
    want = cfg["tok_lr"] * lr_factor(6, 6, cfg["warmup_steps"], cfg["min_lr_ratio"])
    assert ck["scheduler"]["_last_lr"][0] == pytest.approx(want)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step twice
    assert json.load(open(os.path.join(out, "config.json")))["tok_steps"] == 6


@pytest.mark.parametrize("flags,names", [
    (["--set", "tok_channels=16"], ["tok_channels: checkpoint has 8, given 16"]),
    (["--seed", "6", "--set", "rec_loss=l2"], ["seed: checkpoint has 5", "rec_loss"]),
    (["--steps", "2"], ["tok_steps: may only grow"]),
    (["--preset", "demo"], ["preset: checkpoint has 'tiny'"]),
])
def test_resume_with_conflicting_flags_is_a_usage_error(run4, flags, names, capsys):
    before = sorted(os.listdir(run4))
    assert main(["tokenizer", "--out", run4, "--resume", *flags, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "conflict with the checkpoint" in err and all(n in err for n in names), err
    assert sorted(os.listdir(run4)) == before


def test_resume_may_change_cadence_and_machine_keys(run4, capsys):
    assert main(["tokenizer", "--out", run4, "--resume", "--set", "log_every=7", "--set", "keep_ckpts=1",
                 "--set", "num_workers=0", "--set", "threads=0", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["log_every"] == 7 and cfg["keep_ckpts"] == 1 and cfg["seed"] == 5 and cfg["tok_channels"] == 8


def _as_format_1(ck: dict, world: int) -> dict:
    """What main before the training package wrote: format 1, per-rank batches, seed only in config."""
    old = {k: v for k, v in ck.items() if k not in ("seed", "preset")}
    cfg = {k: v for k, v in ck["config"].items() if k not in ("fsq_backend", "skip_bad_images")}
    cfg["tok_batch"] = ck["config"]["tok_batch"] // world
    return old | {"format": 1, "config": cfg, "world_size": world}


def test_old_format_checkpoint_resumes_and_exports(run4, tmp_path, capsys):
    out = str(tmp_path / "old")
    os.makedirs(out)
    torch.save(_as_format_1(_ckpt(run4, 2), world=2), os.path.join(out, "ckpt_00000002.pt"))
    assert main(["tokenizer", "--out", out, "--resume", "--device", "cpu"]) == 0
    assert "resumed tokenizer" in capsys.readouterr().err
    ck = _ckpt(out, 4)
    assert ck["format"] == 2 and ck["seed"] == 5 and ck["config"]["tok_batch"] == 8  # 4 per rank x 2 ranks
    exp = str(tmp_path / "export")
    assert main(["export", "--from", os.path.join(out, "ckpt_00000002.pt"), "--out", exp]) == 0
    tok = FSQTokenizer.from_pretrained(exp)
    ema = _ckpt(run4, 2)["ema"]
    assert all(torch.equal(v, ema[k].to(v.dtype)) for k, v in tok.state_dict().items())
