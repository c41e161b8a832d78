"""Reading an ``fsq-train export`` folder: the layout Hugging Face tools read.

    DIR/model.safetensors   the EMA weights
    DIR/config.json         {"model_type": ..., "architecture": {constructor arguments}, ...}
    DIR/SHA256SUMS          "<sha256>  <file name>" per file (sha256sum -c reads it)

``FSQTokenizer.from_pretrained`` and ``MaskGIT.from_pretrained`` use ``read_pretrained``; the
writer is fsq_kernels/train/export.py. Every failure names the file: PretrainedError.
"""

from __future__ import annotations

import hashlib
import json
import os

from torch import nn

__all__ = ["PretrainedError", "read_pretrained", "load_exported_state", "sha256_file",
           "WEIGHTS_NAME", "CONFIG_NAME", "SUMS_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SUMS_NAME = "SHA256SUMS"


class PretrainedError(ValueError):
    """An export folder is missing a file, holds a damaged one, or does not match the model."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in 1 MiB chunks (checkpoints can be larger than memory allows twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _verify_sums(directory: str) -> None:
    sums = os.path.join(directory, SUMS_NAME)
    if not os.path.isfile(sums):
        raise PretrainedError(f"{sums} is missing; is {directory} an fsq-train export?")
    with open(sums) as f:
        for line in f:
            if not line.strip():
                continue
            want, name = line.split(maxsplit=1)
            path = os.path.join(directory, name.strip().lstrip("*"))
            if not os.path.isfile(path):
                raise PretrainedError(f"{path} is missing (listed in {sums})")
            if sha256_file(path) != want:
                raise PretrainedError(f"{path} is corrupted: its sha256 does not match the one in {sums}")


def read_pretrained(directory: str, model_type: str, map_location="cpu") -> tuple[dict, dict]:
    """(architecture kwargs, state dict) of an export of `model_type`, after checking every file's sha256."""
    if not os.path.isdir(directory):
        raise PretrainedError(f"export folder {directory} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise PretrainedError(f"{os.path.join(directory, name)} is missing; is {directory} an fsq-train export?")
    _verify_sums(directory)
    cfg_path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{cfg_path} is not valid JSON: {e}") from e
    if config.get("model_type") != model_type:
        raise PretrainedError(f"{cfg_path} describes a {config.get('model_type')!r} model; expected {model_type!r}")
    from safetensors.torch import load_file

    try:
        state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise PretrainedError(f"{os.path.join(directory, WEIGHTS_NAME)} cannot be read: {e}") from e
    return dict(config["architecture"]), state


def load_exported_state(model: nn.Module, state: dict, directory: str) -> nn.Module:
    """Load an export's weights into `model` (strict), naming the file on a mismatch; eval mode."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise PretrainedError(f"{os.path.join(directory, WEIGHTS_NAME)} does not match the architecture in "
                              f"{CONFIG_NAME}: {str(e)[:500]}") from e
    return model.eval()
