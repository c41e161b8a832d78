"""Device-independent measurements: ATen ops dispatched, bytes saved for backward, peak memory."""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _DispatchCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher (a kernel launch each on a GPU) and tracks
    the live bytes of the tensors they allocate."""

    _VIEW_OPS_FREE = True

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen_storages: set[int] = set()

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outputs:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen_storages or storage.nbytes() == 0:
                continue
            self._seen_storages.add(key)
            nbytes = storage.nbytes()
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(t, self._release, nbytes)
        return out


def dispatch_profile(fn: Callable[[], object]) -> tuple[int, float]:
    """(ATen ops dispatched by one call, peak MB of the tensors it allocates).

    On CPU the peak is the live bytes of tensors allocated by the call's ops, tracked through the
    dispatcher (inputs excluded); on CUDA it is torch.cuda.max_memory_allocated over the call."""
    fn()  # warm up caches (lazy imports, compilation) outside the count
    counter = _DispatchCounter()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with counter:
        result = fn()
    del result
    if cuda:
        torch.cuda.synchronize()
        return counter.ops, (torch.cuda.max_memory_allocated() - base) / 2**20
    return counter.ops, counter.peak_bytes / 2**20


def saved_bytes_per_element(forward: Callable[[], object], numel: int) -> float:
    """Bytes autograd keeps for backward per input element (distinct storages, once each)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    del result
    return sum(storages.values()) / max(1, numel)
