"""fsq-train's command line: --version, --print-config, per-subcommand flags with help text,
strict --set values, and the exit codes (2 usage, 1 runtime)."""

from __future__ import annotations

import argparse
import json

import pytest

from fsq_kernels import __version__
from fsq_kernels.train.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fsq-train {__version__}"


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_has_help_and_enums_have_choices():
    subs = _subparsers(build_parser())
    assert set(subs) >= {"tokenizer", "maskgit", "demo", "sample", "eval", "export", "tokenize", "study"}
    for name, sp in subs.items():
        for a in sp._actions:
            if a.option_strings and name != "study":
                assert a.help, f"{name} {a.option_strings} has no help text"
    assert subs["tokenizer"]._option_string_actions["--preset"].choices == ["demo", "imagenet256", "mnist", "tiny"]
    assert subs["eval"]._option_string_actions["--device"].choices == ["auto", "cpu", "cuda"]


@pytest.mark.parametrize("argv", [
    ["tokenizer", "--out", "x", "--per-class", "3"],          # a sample flag
    ["sample", "--out", "x", "--tokenizer", "t", "--maskgit", "m", "--resume"],  # a training flag
    ["eval", "--out", "x", "--tokenizer", "t", "--maskgit", "m", "--steps", "3"],
    ["tokenizer", "--out", "x", "--preset", "huge"],           # not a preset
    ["export", "--out", "x"],                                  # --from missing
    ["maskgit", "--out", "x", "--tokenizer", "t", "--codes", "c"],  # exclusive sources
    ["no-such-command"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


@pytest.mark.parametrize("item,message", [("channels_last=ture", "expected a bool"), ("rec_loss=l3", "one of"),
                                          ("nope=1", "unknown config key 'nope'")])
def test_bad_set_values_exit_2(tmp_path, item, message, capsys):
    assert main(["tokenizer", "--out", str(tmp_path / "r"), "--set", item, "--print-config"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_device_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["tokenizer", "--preset", "tiny", "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_sample_set_takes_only_sampling_keys(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path), "--tokenizer", "t", "--maskgit", "m", "--device", "cpu",
                 "--set", "tok_lr=1"]) == 2
    assert "takes only" in capsys.readouterr().err


def test_print_config(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["tokenizer", "--out", str(out), "--preset", "tiny", "--set", "tok_lr=0.5", "--steps", "9",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["tok_lr"] == 0.5 and cfg["tok_steps"] == 9 and cfg["tok_channels"] == 8 and cfg["seed"] == 0
    assert cfg["preset"] == "tiny" and not out.exists()


def test_runtime_errors_exit_1(tmp_path, capsys):
    # a tokenizer that does not exist, an export folder that is not one
    assert main(["sample", "--out", str(tmp_path / "s"), "--tokenizer", str(tmp_path / "none"),
                 "--maskgit", str(tmp_path / "none"), "--device", "cpu"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]) == 1
    assert "no checkpoints" in capsys.readouterr().err
