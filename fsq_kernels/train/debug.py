"""Test hooks, off the normal path: set FSQ_TRAIN_DEBUG to a comma-separated list of

    kill_after=<step>     SIGKILL this process right after the checkpoint of <step> is written
    dump_rank_weights     every rank saves its final model and EMA weights to OUT/rank<r>_weights.pt

Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import os
import signal

import torch

ENV = "FSQ_TRAIN_DEBUG"


def _flags() -> dict:
    out = {}
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def after_checkpoint(step: int) -> None:
    at = _flags().get("kill_after")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def at_end(out: str, rank: int, model, ema) -> None:
    if "dump_rank_weights" in _flags():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, os.path.join(out, f"rank{rank}_weights.pt"))
