"""Training state shared by every stage: EMA of the weights, the RNG streams, the LR schedule,
mixed precision and the optimizer step."""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["EMA", "seed_all", "rng_state", "set_rng_state", "lr_factor", "LRLambda", "autocast_ctx",
           "optimizer_step", "rederive_schedule"]


class EMA:
    """Exponential moving average of a model's state (params and buffers), floats kept in fp32.
    Decay warms up as min(decay, (1 + step) / (10 + step))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}
        self._float_keys = [k for k, v in self.shadow.items() if v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        state = model.state_dict()
        shadow = [self.shadow[k] for k in self._float_keys]
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, [state[k].detach().float() for k in self._float_keys], alpha=1.0 - d)
        for k, s in self.shadow.items():
            if not s.is_floating_point():
                s.copy_(state[k])

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        from .checkpoint import CheckpointError

        missing = set(self.shadow) ^ set(state)
        if missing:
            raise CheckpointError(f"EMA state keys do not match the model: {sorted(missing)[:4]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class LRLambda:
    """lr_factor as an object: LambdaLR checkpoints its __dict__ (a lambda would not be saved)."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.min_ratio)


def rederive_schedule(sched: torch.optim.lr_scheduler.LambdaLR, total: int) -> None:
    """After a resume with a larger step budget: the cosine runs to the new `total` from the step
    reached, and the next step's LR is the new schedule's value there (no jump back to warmup)."""
    for lam in sched.lr_lambdas:
        lam.total = total
    for group, base, lam in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def autocast_ctx(precision: str, device: torch.device):
    """bf16 autocast or nothing; "auto" is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be auto, bf16 or fp32; got {precision!r}")
    return nullcontext()


def optimizer_step(loss: Tensor, params, opt: torch.optim.Optimizer, clip: float,
                   sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> Tensor:
    """zero_grad, backward, clip the gradient norm, step (and the schedule); returns the norm."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    if sched is not None:
        sched.step()
    return gnorm
