"""The generic stage runner: every training stage (tokenizer, MaskGIT, the study's tokenizers, UViM)
is a small ``Stage`` object, and ``run_stage`` does the rest.

A stage provides
    name          str: the checkpoint's "stage" field, the progress bar, log lines
    total_steps   int: the step budget (the runner stops there; `rederive_schedule` on a larger one)
    setup(ctx)    data and anything else that needs no RNG (runs before seeding)
    make_model()  a fresh main model on the device (called under the seeded RNG by build, and for
                  evaluation under a forked RNG: the runner copies the EMA weights into it)
    build(ctx)    -> Parts: the main model, its optimizer and LR scheduler, optional extra modules
                  (e.g. {"disc": discriminator}) and their optimizers ({"disc_optimizer": opt}),
                  all built after ``seed_all(seed)``
    batches(start) an iterator with one batch per step from `start` (a pure function of the step)
    step(parts, step, batch) -> dict: one optimisation step with ``parts.ddp`` (and
                  ``parts.ddp_extras``); returns the values to log (tensors are fine; "loss" at least)
    evaluate(model) -> dict: held-out metrics of `model`, which holds the EMA weights (rank 0 only)
and may override checkpoint_extra() (more top-level checkpoint entries), config_extra() (more
config.json entries) and bar_fields ({log key: format} shown on the progress bar).

The runner handles: the run folder (refuses to overwrite a run unless resuming), seeding (``seed``
for the build, then ``seed * 1000 + rank`` per rank), resume (weights, EMA, optimizers, scheduler,
step, per-rank RNG; metrics.jsonl trimmed to the resumed step; a larger step budget re-derives the
cosine), the DDP wrap of the model and the extra modules, the EMA update after each step, the
progress bar, logging every ``cfg.log_every`` steps, evaluation under the EMA weights every
``cfg.eval_every`` steps, checkpoints every ``cfg.ckpt_every`` steps (atomic, ``cfg.keep_ckpts``
kept) and the final one. `cfg` is any dataclass with those fields and ``ema_decay``.

Example (a stage that fits y = 2x)::

    class Line(Stage):
        name, total_steps = "line", 100

        def make_model(self):
            return nn.Linear(1, 1)

        def build(self, ctx):
            model = self.make_model()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            return Parts(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, LRLambda(100, 5, 0.1)))

        def batches(self, start):
            for s in range(start, self.total_steps):
                x = torch.randn(8, 1, generator=torch.Generator().manual_seed(s))
                yield x, 2 * x

        def step(self, parts, step, batch):
            x, y = batch
            loss = (parts.ddp(x) - y).pow(2).mean()
            return {"loss": loss.detach(), "grad_norm": optimizer_step(loss, parts.model.parameters(),
                                                                      parts.optimizer, 1.0, parts.scheduler)}

        def evaluate(self, model):
            return {"val_weight": float(model.weight)}

    run_stage(Line(), cfg, "runs/line", seed=0, resume=False, ctx=setup_distributed())
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import debug
from .checkpoint import CKPT_FORMAT, CheckpointError, atomic_write, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import Ctx, barrier, ddp_wrap, gather_objects
from .logs import MetricsLog, log
from .state import EMA, LRLambda, rederive_schedule, rng_state, seed_all, set_rng_state

__all__ = ["Stage", "Parts", "run_stage", "prepare_out", "RunExistsError"]


class RunExistsError(ValueError):
    """The output folder already holds checkpoints and no resume was asked for."""


@dataclass
class Parts:
    model: nn.Module                                  # EMA-tracked, evaluated, exported; ckpt "model"
    optimizer: torch.optim.Optimizer                  # ckpt "optimizer"
    scheduler: torch.optim.lr_scheduler.LRScheduler   # ckpt "scheduler"
    extras: dict = field(default_factory=dict)        # name -> nn.Module, DDP-wrapped, ckpt under name
    extra_optimizers: dict = field(default_factory=dict)  # name -> optimizer, ckpt under name
    # filled in by the runner
    ddp: nn.Module | None = None
    ddp_extras: dict = field(default_factory=dict)
    ema: EMA | None = None


class Stage:
    """Base class of a training stage; see the module docstring for what a subclass provides."""

    name: str = "stage"
    total_steps: int = 0
    bar_fields: dict = {"loss": ".4f"}

    def setup(self, ctx: Ctx) -> None:
        pass

    def make_model(self) -> nn.Module:
        raise NotImplementedError

    def build(self, ctx: Ctx) -> Parts:
        raise NotImplementedError

    def batches(self, start: int):
        raise NotImplementedError

    def step(self, parts: Parts, step: int, batch) -> dict:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict:
        return {}

    def checkpoint_extra(self) -> dict:
        return {}

    def config_extra(self) -> dict:
        return {}


def prepare_out(out: str, resume: bool, ctx: Ctx) -> str | None:
    """Create `out`; return the checkpoint to resume from (None for a fresh start)."""
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    barrier(ctx)
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", out)
        return latest
    if latest is not None:
        raise RunExistsError(f"{out} already holds checkpoints (latest {os.path.basename(latest)}); "
                             "pass --resume to continue it or choose another --out")
    return None


def _restore(parts: Parts, ck: dict, path: str, ctx: Ctx, seed: int, total: int) -> int:
    parts.model.load_state_dict(ck["model"])
    parts.ema.load_state_dict(ck["ema"])
    parts.optimizer.load_state_dict(ck["optimizer"])
    parts.scheduler.load_state_dict(ck["scheduler"])
    for name, obj in list(parts.extras.items()) + list(parts.extra_optimizers.items()):
        if name not in ck:
            raise CheckpointError(f"{path} has no {name!r} state, which this configuration trains")
        obj.load_state_dict(ck[name])
    if any(isinstance(lam, LRLambda) and lam.total != total for lam in getattr(parts.scheduler, "lr_lambdas", [])):
        rederive_schedule(parts.scheduler, total)
    step = int(ck["step"])
    rng = ck["rng"]
    if len(rng) == ctx.world:
        set_rng_state(rng[ctx.rank])
    else:
        log.warning("%s was written by %d ranks, now %d: RNG streams re-seeded", path, len(rng), ctx.world)
        seed_all(step * 7919 + ctx.rank)
    return step


def run_stage(stage: Stage, cfg, out: str, seed: int, resume: bool, ctx: Ctx, preset: str | None = None) -> str:
    """Train `stage` in `out` to stage.total_steps; returns the path of the final checkpoint."""
    resume_path = prepare_out(out, resume, ctx)
    stage.setup(ctx)
    seed_all(seed)
    parts = stage.build(ctx)
    parts.ema = EMA(parts.model, cfg.ema_decay)
    total = stage.total_steps
    step = 0
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), ctx.is_main)
    if resume_path is not None:
        step = _restore(parts, load_checkpoint(resume_path, stage.name), resume_path, ctx, seed, total)
        dropped = metrics.trim(step)
        log.info("resumed %s from %s at step %d%s", stage.name, resume_path, step,
                 f" ({dropped} metrics records after it dropped)" if dropped else "")
    else:
        seed_all(seed * 1000 + ctx.rank)  # per-rank stream for anything random during training
    parts.ddp = ddp_wrap(parts.model, ctx)
    parts.ddp_extras = {k: ddp_wrap(m, ctx) for k, m in parts.extras.items()}
    config = dataclasses.asdict(cfg) | {"seed": seed}
    if ctx.is_main:
        info = config | {"stage": stage.name, "preset": preset} | stage.config_extra()
        atomic_write(os.path.join(out, "config.json"), lambda f: json.dump(info, f, indent=1), mode="w")

    def checkpoint(at: int) -> None:
        rng = gather_objects(rng_state(), ctx)
        if ctx.is_main:
            state = {"format": CKPT_FORMAT, "stage": stage.name, "step": at, "seed": seed, "preset": preset,
                     "config": config, "model": parts.model.state_dict(), "ema": parts.ema.state_dict(),
                     "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                     "rng": rng, "world_size": ctx.world}
            state |= {k: m.state_dict() for k, m in parts.extras.items()}
            state |= {k: o.state_dict() for k, o in parts.extra_optimizers.items()}
            save_checkpoint(out, at, state | stage.checkpoint_extra(), cfg.keep_ckpts)
        barrier(ctx)
        debug.after_checkpoint(at)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=stage.name, disable=not ctx.is_main, dynamic_ncols=True,
               mininterval=2.0)
    eval_model = None
    t0 = time.time()
    parts.model.train()
    stream = stage.batches(step)
    while step < total:
        logs = stage.step(parts, step, next(stream))
        parts.ema.update(parts.model, step)
        step += 1
        bar.update(1)
        last = step == total
        if step % cfg.log_every == 0 or last:
            metrics.write({"step": step} | logs | {"lr": parts.scheduler.get_last_lr()[0], "seconds": time.time() - t0})
            bar.set_postfix({k: format(float(logs[k]), f) for k, f in stage.bar_fields.items() if k in logs})
        if ctx.is_main and (step % cfg.eval_every == 0 or last):
            with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG
                if eval_model is None:
                    eval_model = stage.make_model().requires_grad_(False)
                parts.ema.copy_to(eval_model)
                metrics.write({"step": step} | stage.evaluate(eval_model))
        if step % cfg.ckpt_every == 0 or last:
            checkpoint(step)
    bar.close()
    debug.at_end(out, ctx.rank, parts.model, parts.ema)
    barrier(ctx)
    return latest_checkpoint(out)
