"""Diagnostics through ``logging`` (stderr, rank 0 only) and the per-stage metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
from torch import Tensor

from .checkpoint import atomic_write

__all__ = ["log", "configure_logging", "MetricsLog", "read_jsonl"]

log = logging.getLogger("fsq_kernels.train")


def configure_logging(rank: int, level: int = logging.INFO) -> None:
    """The package's loggers (fsq_kernels.*: training, data checks): INFO and up to stderr on
    rank 0; other ranks report errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[fsq-train] %(message)s"))
    root = logging.getLogger("fsq_kernels")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.ERROR)
    root.propagate = False


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends one JSON record per line (rank 0 only)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if isinstance(v, (Tensor, np.floating)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def trim(self, step: int) -> int:
        """Drop the records after `step` (a resume repeats them); returns how many went."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept), mode="w")
        return len(records) - len(kept)
