"""Whole-pipeline tests of fsq-train on a tiny configuration (CPU): the demo end to end, bit-exact
resume after SIGKILL, clear errors on damaged checkpoints, and DDP (gloo) weight agreement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # deterministic CPU math, and no oversubscription
    env.pop("FSQ_TRAIN_DEBUG", None)
    env.update(extra)
    return env


def _train(*args, env=None, check=True, timeout=300):
    cmd = [sys.executable, "-m", "fsq_kernels.train", *args]
    p = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _ckpt(d, step):
    return torch.load(os.path.join(d, f"ckpt_{step:08d}.pt"), map_location="cpu", weights_only=True)


def _assert_same_state(a, b, keys):
    for k in keys:
        sa, sb = a[k], b[k]
        if isinstance(sa, dict) and "state" in sa:  # optimizer
            for pid in sa["state"]:
                for name, t in sa["state"][pid].items():
                    assert torch.equal(t, sb["state"][pid][name]), f"{k}[{pid}].{name} differs"
        else:
            for name, t in sa.items():
                if isinstance(t, torch.Tensor):
                    assert torch.equal(t, sb[name]), f"{k}.{name} differs"
                else:
                    assert t == sb[name], f"{k}.{name} differs"


# Pinned backend and device (a visible GPU changes nothing here; DDP stays on gloo).
TINY = ["--preset", "tiny", "--seed", "3", "--device", "cpu", "--set", "fsq_backend=cpp"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    _train("tokenizer", *TINY, "--out", d)
    return d


def test_demo_tiny_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    p = _train("demo", *TINY, "--out", out)
    assert "demo finished in" in p.stderr and json.loads(p.stdout)["tokenizer"]["psnr"] > 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    for sec, keys in {"tokenizer": ["psnr", "codebook_usage", "perplexity"], "maskgit": ["val_accuracy", "val_loss"],
                      "samples": ["class_accuracy", "frechet_distance"], "reference": ["frechet_distance"]}.items():
        for k in keys:
            assert isinstance(m[sec][k], float), (sec, k)
    assert 0 <= m["tokenizer"]["codebook_usage"] <= 1 and 1 <= m["tokenizer"]["perplexity"] <= 1000
    assert 0 <= m["samples"]["class_accuracy"] <= 1 and m["seconds"] > 0
    for f in ("reconstructions.png", "samples.png", "curves.png"):
        assert os.path.getsize(os.path.join(out, f)) > 500
    lines = open(os.path.join(out, "tokenizer", "metrics.jsonl")).read().splitlines()
    assert all("step" in json.loads(x) for x in lines)
    # training steps log the batch's codebook usage from the fused histogram
    train_logs = [json.loads(x) for x in lines if "loss" in json.loads(x)]
    assert train_logs and all(0 < r["train_codebook_usage"] <= 1 and 1 <= r["train_perplexity"] <= 1000
                              for r in train_logs)
    # the sample subcommand reuses the trained stages
    _train("sample", "--out", str(tmp_path / "s"), "--tokenizer", os.path.join(out, "tokenizer"),
           "--maskgit", os.path.join(out, "maskgit"), "--per-class", "2")
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True)["images"].shape[0] == 10
    # an existing run is not overwritten without --resume
    p = _train("tokenizer", *TINY, "--out", os.path.join(out, "tokenizer"), check=False)
    assert p.returncode == 1 and "--resume" in p.stderr


@pytest.mark.parametrize("stage", ["tokenizer", "maskgit"])
def test_sigkill_resume_matches_uninterrupted(tmp_path, stage, tiny_tokenizer):
    # the tokenizer run has the GAN on from step 2, so discriminator state is part of the resume
    extra = ["--set", "disc_start=2"] if stage == "tokenizer" else ["--tokenizer", tiny_tokenizer]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    _train(stage, *TINY, *extra, "--out", ref)
    p = _train(stage, *TINY, *extra, "--out", cut, env=_env(FSQ_TRAIN_DEBUG="kill_after=3"), check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert os.path.exists(os.path.join(cut, "ckpt_00000003.pt"))
    assert not os.path.exists(os.path.join(cut, "ckpt_00000006.pt"))
    assert not [f for f in os.listdir(cut) if ".tmp" in f]
    p = _train(stage, *TINY, *extra, "--out", cut, "--resume")
    assert "resumed" in p.stderr and "step 3" in p.stderr
    a, b = _ckpt(ref, 6), _ckpt(cut, 6)
    keys = ["model", "ema", "optimizer", "scheduler"] + (["disc", "disc_optimizer"] if stage == "tokenizer" else [])
    _assert_same_state(a, b, keys)
    assert a["step"] == b["step"] == 6
    for r_a, r_b in zip(a["rng"], b["rng"]):
        assert torch.equal(r_a["torch"], r_b["torch"])


def test_damaged_checkpoint_is_an_error_not_a_restart(tmp_path):
    out = str(tmp_path / "run")
    _train("tokenizer", *TINY, "--out", out, "--steps", "3")
    path = os.path.join(out, "ckpt_00000003.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    p = _train("tokenizer", *TINY, "--out", out, "--steps", "6", "--resume", check=False)
    assert p.returncode == 1 and "corrupted or truncated" in p.stderr and "ckpt_00000003.pt" in p.stderr
    assert not os.path.exists(os.path.join(out, "ckpt_00000006.pt"))
    # without the recorded digest the load itself fails, with the same kind of message
    os.remove(path + ".sha256")
    p = _train("tokenizer", *TINY, "--out", out, "--steps", "6", "--resume", check=False)
    assert p.returncode == 1 and "cannot be read" in p.stderr
    # garbage in place of a checkpoint
    open(path, "wb").write(b"not a checkpoint at all")
    p = _train("tokenizer", *TINY, "--out", out, "--steps", "6", "--resume", check=False)
    assert p.returncode == 1 and "ckpt_00000003.pt" in p.stderr
    assert not os.path.exists(os.path.join(out, "ckpt_00000006.pt"))


@pytest.mark.parametrize("stage", ["tokenizer", "maskgit"])
def test_ddp_two_processes_gloo_keep_identical_weights(tmp_path, stage, tiny_tokenizer):
    out = str(tmp_path / "ddp")
    extra = ["--set", "disc_start=1"] if stage == "tokenizer" else ["--tokenizer", tiny_tokenizer]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fsq_kernels.train", stage, *TINY, *extra, "--steps", "4", "--out", out]
    p = subprocess.run(cmd, env=_env(FSQ_TRAIN_DEBUG="dump_rank_weights"), capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    w0 = torch.load(os.path.join(out, "rank0_weights.pt"), weights_only=True)
    w1 = torch.load(os.path.join(out, "rank1_weights.pt"), weights_only=True)
    for part in ("model", "ema"):
        assert w0[part].keys() == w1[part].keys()
        for k in w0[part]:
            assert torch.equal(w0[part][k], w1[part][k]), f"{part}.{k} differs between ranks"
    ck = _ckpt(out, 4)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert ck["config"]["tok_batch" if stage == "tokenizer" else "mg_batch"] == 8  # global: 4 per rank
    # the ranks drew different random streams (masks / data), yet agree on the weights
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    assert all(torch.isfinite(v).all() for v in w0["model"].values() if v.is_floating_point())
    if stage == "tokenizer":  # the same run resumes on one process, with the same global batch
        p = _train(stage, "--out", out, "--resume", "--steps", "5", "--device", "cpu")
        assert "written by 2 ranks, now 1" in p.stderr and _ckpt(out, 5)["config"]["tok_batch"] == 8


def make_image_folder(root, per_class: int, height: int, width: int) -> None:
    """root/a/*.png and root/b/*.png: random RGB images of a fixed seed."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(per_class):
            arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_image_folder_training_path(tmp_path):
    """Image folders go through a DataLoader with workers, and MaskGIT tokenizes them per batch."""
    root = tmp_path / "imgs"
    make_image_folder(root, 12, 20, 24)
    common = ["--preset", "tiny", "--device", "cpu", "--data", f"folder:{root}", "--set", "image_size=16", "--set", "num_workers=1",
              "--set", "num_val=4", "--set", "num_train=0", "--steps", "2"]
    _train("tokenizer", *common, "--out", str(tmp_path / "tok"))
    _train("maskgit", *common, "--out", str(tmp_path / "mg"), "--tokenizer", str(tmp_path / "tok"))
    ck = _ckpt(str(tmp_path / "mg"), 2)
    assert ck["extra"]["num_tokens"] == 16 and ck["extra"]["class_names"] == ["a", "b"]


def test_tokenize_sharded_over_two_ranks_matches_one(tmp_path, tiny_tokenizer):
    import numpy as np

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _train("tokenize", "--tokenizer", tiny_tokenizer, "--out", one, "--device", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fsq_kernels.train", "tokenize", "--tokenizer", tiny_tokenizer, "--out", two, "--device", "cpu",
           "--batch", "50"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("tokens.npy", "labels.npy", "val_tokens.npy", "val_labels.npy"):
        assert np.array_equal(np.load(os.path.join(one, name)), np.load(os.path.join(two, name))), name
    assert not [f for f in os.listdir(two) if ".tmp" in f]
