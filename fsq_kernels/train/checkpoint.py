"""Checkpoint I/O and the one atomic-write helper every writer of the training package uses.

A stage writes ``OUT/ckpt_<step>.pt`` (temp file in the same folder, fsync, rename, fsync of the
folder) and ``ckpt_<step>.pt.sha256``. Checkpoints are read with ``torch.load(weights_only=True)``;
any damage raises CheckpointError naming the file, never a silent restart.

Format 2 (this code) holds: format, stage, step, seed, preset, config (batches global), model, ema,
optimizer, scheduler, rng (one state per rank), world_size, and stage extras (``extra``, ``disc``,
``disc_optimizer``). Format 1 (main before the training package) is read too: its per-rank batches
are converted to global ones (x its world size) and its seed comes from its config.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from ..models.pretrained import sha256_file

__all__ = ["CKPT_FORMAT", "CheckpointError", "atomic_write", "atomic_torch_save", "sha256_file", "save_checkpoint",
           "load_checkpoint", "list_checkpoints", "latest_checkpoint", "resolve_checkpoint"]

CKPT_FORMAT = 2
READABLE_FORMATS = (1, 2)
_CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")
_REQUIRED_KEYS = ("format", "stage", "step", "config", "model", "ema", "optimizer", "scheduler", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not hold what a resume needs."""


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """Call ``write(f)`` on a temp file beside `path`, fsync it, rename it over `path`, fsync the
    folder. A crash leaves either the old file or the new one, never a torn one."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(d)


def atomic_torch_save(obj, path: str) -> str:
    """torch.save through atomic_write; returns the file's sha256."""
    atomic_write(path, lambda f: torch.save(obj, f))
    return sha256_file(path)


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    if not os.path.isdir(out):
        return []
    found = [(int(m.group(1)), os.path.join(out, name)) for name in os.listdir(out) if (m := _CKPT_RE.match(name))]
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    ck = list_checkpoints(out)
    return ck[-1][1] if ck else None


def save_checkpoint(out: str, step: int, state: dict, keep: int) -> str:
    path = os.path.join(out, f"ckpt_{step:08d}.pt")
    digest = atomic_torch_save(state, path)
    atomic_write(path + ".sha256", lambda f: f.write(digest + "\n"), mode="w")
    for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        for p in (old, old + ".sha256"):
            if os.path.exists(p):
                os.remove(p)
    return path


def _upgrade(ck: dict) -> dict:
    """A format-1 checkpoint in format 2's terms (global batches, top-level seed)."""
    if ck["format"] == 1:
        world = int(ck.get("world_size", 1))
        cfg = dict(ck["config"])
        for key in ("tok_batch", "mg_batch"):
            if key in cfg:
                cfg[key] = int(cfg[key]) * world
        ck = ck | {"config": cfg, "seed": int(cfg.get("seed", 0)), "preset": None, "format_read": 1}
    return ck


def load_checkpoint(path: str, stage: str | None = None) -> dict:
    """Read a checkpoint with weights_only=True; any damage raises CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = path + ".sha256"
    if os.path.exists(side):
        with open(side) as f:
            want = f.read().strip()
        got = sha256_file(path)
        if want and got != want:
            raise CheckpointError(
                f"checkpoint {path} is corrupted or truncated: its sha256 {got[:12]}... does not match "
                f"the {want[:12]}... recorded when it was written. Delete it to resume from an older one.")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, unpickling errors, EOF
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or any(k not in ck for k in _REQUIRED_KEYS):
        have = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"checkpoint {path} is not an fsq-train checkpoint (keys: {have})")
    if ck["format"] not in READABLE_FORMATS:
        raise CheckpointError(f"checkpoint {path} has format {ck['format']}; this code reads {READABLE_FORMATS}")
    if stage is not None and ck["stage"] != stage:
        raise CheckpointError(f"checkpoint {path} is a {ck['stage']!r} checkpoint; expected {stage!r}")
    return _upgrade(ck)


def resolve_checkpoint(path_or_dir: str, stage: str | None) -> dict:
    """A checkpoint file (of `stage`, when given), or the latest one in its folder."""
    path = path_or_dir
    if os.path.isdir(path_or_dir):
        path = latest_checkpoint(path_or_dir)
        if path is None:
            raise CheckpointError(f"no checkpoints (ckpt_*.pt) in {path_or_dir}; train the {stage or 'stage'} first")
    return load_checkpoint(path, stage)
