"""UViM (Kolesnikov et al., 2022) with an FSQ guiding code, on the stage runner.

    fsq-train uvim --task depth|colorization|panoptic --out DIR [--quantizer fsq|vq-uvim|vq]
                   [--preset default|quick|tiny] [--levels 5,5,5] [--seed S] [--resume] [--set KEY=VALUE]

Stage I (``uvim_stage1``) trains the restricted oracle, the quantizer and the base model f(x, z)
with code dropout (models/uvim.py). Stage II (``uvim_lm``) trains the language model (models/uvim_lm.py)
on the codes the frozen stage-I oracle (EMA weights) gives the training images. Both run on
``run_stage``: DDP, resume, EMA, atomic checkpoints, metrics.jsonl. Then, on the held-out
``test`` split (uvim_eval.py): the task metric with the language model's code (x -> LM -> z ->
f(x, z)), the oracle's code, no code, and a shuffled code (the oracle code of another held-out
image), with bootstrap standard errors; codebook usage and perplexity of the oracle's codes;
the language model's held-out code accuracy and perplexity. Writes OUT/stage1/, OUT/lm/,
OUT/metrics.json and OUT/grid.png (rows: input, target, LM code, oracle code, no code, shuffled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .. import uvim_tasks
from ..models.uvim import QUANTIZERS, StageOne
from ..models.uvim_lm import CodeLM, lm_loss
from .batches import batch_indices
from .checkpoint import CheckpointError, atomic_write, latest_checkpoint, load_checkpoint
from .config import ConfigError, parse_value
from .distributed import Ctx, cleanup_distributed, setup_distributed
from .runner import Parts, RunExistsError, Stage, run_stage
from .state import LRLambda, optimizer_step

__all__ = ["UViMConfig", "UVIM_PRESETS", "TASK_LEVELS", "TASK_TEMPERATURE", "make_uvim_config", "StageOneStage", "LMStage",
           "load_stage_one", "load_lm", "lm_input", "train_uvim", "main"]

# The default level set per task: small, sized to what a toy task needs (the prototype used
# 16% of [8,5,5,5]).
TASK_LEVELS = {"depth": [5, 5, 5], "colorization": [7, 5, 5], "panoptic": [7, 5, 5]}
# How the language model decodes, per task, by what the ranking metric rewards: colorization's
# Frechet distance compares distributions, so the code is sampled (temperature 1; greedy collapses
# onto frequent hues); depth RMSE and panoptic PQ score one answer per image, so the code is the
# greedy (most likely) one. Chosen on the val split (docs/uvim/README.md), never on the test split.
TASK_TEMPERATURE = {"depth": 0.0, "colorization": 1.0, "panoptic": 0.0}


@dataclass
class UViMConfig:
    task: str = "colorization"
    quantizer: str = "fsq"          # fsq | vq-uvim (UViM's VQ with splitting) | vq (plain VQ baseline)
    levels: list = field(default_factory=list)  # empty = TASK_LEVELS[task]; VQs get prod(levels) codes
    num_train: int = 10000
    num_val: int = 256              # in-training evaluation (val split)
    num_test: int = 1024            # final evaluation (test split): 16,384 code tokens
    width: int = 32                 # base U-Net width (about 217k parameters at 32)
    oracle_width: int = 32
    vq_dim: int = 16                # code dimension of both VQs
    vq_decay: float = 0.99          # UViM VQ: EMA decay of the dictionary
    vq_min_count: float = 0.1       # UViM VQ: split when a discounted count falls below this
    s1_steps: int = 700             # sized so that the default study (6 models) fits in an hour here
    s1_batch: int = 32
    s1_lr: float = 2e-3
    lm_steps: int = 1200            # cheap next to stage I (the LM reads 8x8 features)
    lm_batch: int = 64
    lm_lr: float = 1e-3
    lm_weight_decay: float = 0.01
    lm_width: int = 128
    lm_depth: int = 3
    lm_heads: int = 4
    lm_input: str = "features"      # what the LM reads: "features" (the frozen base model's no-code
                                    # bottleneck, 8x8) or "image" (x through the LM's own conv stem)
    temperature: float = -1.0       # LM sampling temperature at inference (0 = greedy); < 0: TASK_TEMPERATURE
    bootstrap: int = 200            # resamples for standard errors
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    log_every: int = 50
    eval_every: int = 1_000_000     # in-training evaluation: at the end only, by default
    ckpt_every: int = 1000
    keep_ckpts: int = 1
    threads: int = 1                # torch CPU threads (0 = torch's default). 1: these models are small,
                                    # and on a shared 2-core machine two threads ran 6x slower than one
                                    # (stage I 1.3 against 7.8 steps/s beside one other busy process)


UVIM_PRESETS: dict[str, dict] = {
    "default": {},
    # a smoke run of the whole study (6 models) in about 5 minutes on a quiet 2-core CPU: too short
    # for the claims; 512 held-out images (8,192 code tokens)
    # vq_decay 0.95: an unused codeword's count falls below vq_min_count after 45 steps (0.99: 229),
    # so UViM's VQ splits within the short run
    "quick": dict(num_train=2000, num_test=512, s1_steps=80, lm_steps=50, lm_width=96, lm_depth=2, bootstrap=50,
                  warmup_steps=10, log_every=20, vq_decay=0.95),
    # CI: seconds
    "tiny": dict(num_train=64, num_val=8, num_test=32, width=8, oracle_width=8, vq_dim=4, s1_steps=3, s1_batch=8,
                 lm_steps=3, lm_batch=8, lm_width=16, lm_depth=1, lm_heads=2, bootstrap=8, warmup_steps=1,
                 log_every=1, ckpt_every=1000, ema_decay=0.9, threads=0),  # threads 0: leave the caller's setting
}
RESUME_MUTABLE = ("s1_steps", "lm_steps", "log_every", "eval_every", "ckpt_every", "keep_ckpts", "threads")


def make_uvim_config(preset: str | None = None, overrides: list[str] | None = None, **fields) -> UViMConfig:
    """UViMConfig() updated by a preset, then `fields`, then ``KEY=VALUE`` overrides; validated."""
    cfg = UViMConfig()
    if preset:
        if preset not in UVIM_PRESETS:
            raise ConfigError(f"unknown uvim preset {preset!r}; choose from {sorted(UVIM_PRESETS)}")
        cfg = dataclasses.replace(cfg, **UVIM_PRESETS[preset])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fields.items() if v is not None})
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not hasattr(cfg, key):
            raise ConfigError(f"--set: expected KEY=VALUE with a UViMConfig key; got {item!r}")
        setattr(cfg, key, parse_value(key, text, getattr(cfg, key) if getattr(cfg, key) != [] else [1]))
    if cfg.task not in uvim_tasks.TASKS:
        raise ConfigError(f"task must be one of {list(uvim_tasks.TASKS)}; got {cfg.task!r}")
    if cfg.quantizer not in QUANTIZERS:
        raise ConfigError(f"quantizer must be one of {list(QUANTIZERS)}; got {cfg.quantizer!r}")
    if cfg.lm_input not in ("features", "image"):
        raise ConfigError(f"lm_input must be 'features' or 'image'; got {cfg.lm_input!r}")
    if not cfg.levels:
        cfg.levels = list(TASK_LEVELS[cfg.task])
    if cfg.temperature < 0:
        cfg.temperature = TASK_TEMPERATURE[cfg.task]
    return cfg


def config_from_checkpoint(ck: dict) -> UViMConfig:
    known = {f.name for f in dataclasses.fields(UViMConfig)}
    return UViMConfig(**{k: v for k, v in ck["config"].items() if k in known})


def build_stage_one(cfg: UViMConfig, seed: int = 0) -> StageOne:
    t = uvim_tasks.get_task(cfg.task)
    return StageOne(t.x_channels, t.y_channels, t.out_channels, cfg.quantizer, list(cfg.levels), cfg.width,
                    cfg.oracle_width, cfg.vq_dim, cfg.vq_decay, cfg.vq_min_count, seed)


def build_lm(cfg: UViMConfig, codebook_size: int, num_tokens: int) -> CodeLM:
    t = uvim_tasks.get_task(cfg.task)
    if cfg.lm_input == "features":
        return CodeLM(codebook_size, num_tokens, 2 * cfg.width, cfg.lm_width, cfg.lm_depth, cfg.lm_heads, in_stride=1)
    return CodeLM(codebook_size, num_tokens, t.x_channels, cfg.lm_width, cfg.lm_depth, cfg.lm_heads)


@torch.no_grad()
def lm_input(cfg: UViMConfig, stage_one: StageOne, x: torch.Tensor) -> torch.Tensor:
    """What the language model reads for images x (cfg.lm_input)."""
    return stage_one.image_features(x) if cfg.lm_input == "features" else x


def _adamw(model, lr: float, weight_decay: float, steps: int, cfg: UViMConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, LRLambda(steps, cfg.warmup_steps, cfg.min_lr_ratio))


@torch.no_grad()
def oracle_codes(model: StageOne, task, data, device, batch: int = 500) -> torch.Tensor:
    """The oracle's code indices (N, h * w) of every image of `data` (no dropout)."""
    model.eval()
    out = []
    for i in range(0, len(data), batch):
        idx = torch.arange(i, min(i + batch, len(data)))
        x, y = task.x(data, idx).to(device), task.encode_target(data.y[idx]).to(device)
        out.append(model.encode(x, y)[1].flatten(1).cpu())
    return torch.cat(out)


class StageOneStage(Stage):
    name = "uvim_stage1"
    bar_fields = {"loss": ".4f"}

    def __init__(self, cfg: UViMConfig, seed: int):
        self.cfg, self.seed, self.total_steps = cfg, seed, cfg.s1_steps
        self.task = uvim_tasks.get_task(cfg.task)

    def setup(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.train = uvim_tasks.generate(self.cfg.task, self.cfg.num_train, self.seed, "train")
        self.val = uvim_tasks.generate(self.cfg.task, self.cfg.num_val, self.seed, "val")

    def make_model(self) -> StageOne:
        return build_stage_one(self.cfg, self.seed).to(self.ctx.device)

    def build(self, ctx: Ctx) -> Parts:
        model = self.make_model()
        return Parts(model, *_adamw(model, self.cfg.s1_lr, 0.0, self.cfg.s1_steps, self.cfg))

    def batches(self, start: int):
        for s in range(start, self.total_steps):
            idx = batch_indices(len(self.train), self.cfg.s1_batch, self.seed, s, self.ctx.rank, self.ctx.world)
            yield self.task.x(self.train, idx), self.train.y[idx]

    def step(self, parts: Parts, step: int, batch) -> dict:
        dev = self.ctx.device
        x, y = batch[0].to(dev), batch[1].to(dev)
        out, _ = parts.ddp(x, self.task.encode_target(y))
        task_loss = self.task.loss(out, y)
        loss = task_loss + parts.model.aux_loss
        gnorm = optimizer_step(loss, parts.model.parameters(), parts.optimizer, self.cfg.grad_clip, parts.scheduler)
        return {"loss": loss.detach(), "task_loss": task_loss.detach(), "grad_norm": gnorm}

    @torch.no_grad()
    def evaluate(self, model: StageOne) -> dict:
        """Held-out (val) task loss with the oracle's code and with none."""
        model.eval()
        dev, t = self.ctx.device, self.task
        idx = torch.arange(len(self.val))
        x, y = t.x(self.val, idx).to(dev), self.val.y.to(dev)
        codes, _ = model.encode(x, t.encode_target(y))
        return {"val_loss_oracle": float(t.loss(model.decode(x, codes), y)),
                "val_loss_no_code": float(t.loss(model.decode(x, None), y))}


def load_stage_one(path_or_dir: str, device) -> tuple[StageOne, UViMConfig, dict]:
    """A trained stage I with its EMA weights, in eval mode; also its config and checkpoint."""
    path = latest_checkpoint(path_or_dir) if os.path.isdir(path_or_dir) else path_or_dir
    if path is None:
        raise FileNotFoundError(f"no stage-I checkpoint in {path_or_dir}")
    ck = load_checkpoint(path, StageOneStage.name)
    cfg = config_from_checkpoint(ck)
    model = build_stage_one(cfg, int(ck["seed"])).to(device)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ck["ema"].items()})
    return model.eval().requires_grad_(False), cfg, ck


class LMStage(Stage):
    name = "uvim_lm"
    bar_fields = {"loss": ".3f", "accuracy": ".3f"}

    def __init__(self, cfg: UViMConfig, seed: int, stage_one: str):
        self.cfg, self.seed, self.stage_one, self.total_steps = cfg, seed, stage_one, cfg.lm_steps
        self.task = uvim_tasks.get_task(cfg.task)

    def setup(self, ctx: Ctx) -> None:
        self.ctx = ctx
        model, _, _ = load_stage_one(self.stage_one, ctx.device)
        self.stage_one_model = model  # frozen: its no-code features feed the LM (cfg.lm_input)
        self.codebook_size = model.codebook_size
        self.train = uvim_tasks.generate(self.cfg.task, self.cfg.num_train, self.seed, "train")
        self.val = uvim_tasks.generate(self.cfg.task, self.cfg.num_val, self.seed, "val")
        self.train_codes = oracle_codes(model, self.task, self.train, ctx.device)
        self.val_codes = oracle_codes(model, self.task, self.val, ctx.device)

    def make_model(self) -> CodeLM:
        return build_lm(self.cfg, self.codebook_size, self.train_codes.shape[1]).to(self.ctx.device)

    def build(self, ctx: Ctx) -> Parts:
        model = self.make_model()
        return Parts(model, *_adamw(model, self.cfg.lm_lr, self.cfg.lm_weight_decay, self.cfg.lm_steps, self.cfg))

    def batches(self, start: int):
        for s in range(start, self.total_steps):
            idx = batch_indices(len(self.train), self.cfg.lm_batch, self.seed, s, self.ctx.rank, self.ctx.world)
            yield self.task.x(self.train, idx), self.train_codes[idx]

    def step(self, parts: Parts, step: int, batch) -> dict:
        x, codes = batch[0].to(self.ctx.device), batch[1].to(self.ctx.device)
        ce, acc = lm_loss(parts.ddp(lm_input(self.cfg, self.stage_one_model, x), codes), codes)
        gnorm = optimizer_step(ce, parts.model.parameters(), parts.optimizer, self.cfg.grad_clip, parts.scheduler)
        return {"loss": ce.detach(), "accuracy": acc.detach(), "grad_norm": gnorm}

    @torch.no_grad()
    def evaluate(self, model: CodeLM) -> dict:
        model.eval()
        x = self.task.x(self.val, torch.arange(len(self.val))).to(self.ctx.device)
        codes = self.val_codes.to(self.ctx.device)
        ce, acc = lm_loss(model(lm_input(self.cfg, self.stage_one_model, x), codes), codes)
        return {"val_loss": float(ce), "val_accuracy": float(acc)}

    def checkpoint_extra(self) -> dict:
        return {"extra": {"codebook_size": self.codebook_size, "num_tokens": int(self.train_codes.shape[1])},
                "source": {"stage_one": self.stage_one}}


def load_lm(path_or_dir: str, device) -> CodeLM:
    path = latest_checkpoint(path_or_dir) if os.path.isdir(path_or_dir) else path_or_dir
    if path is None:
        raise FileNotFoundError(f"no language-model checkpoint in {path_or_dir}")
    ck = load_checkpoint(path, LMStage.name)
    cfg = config_from_checkpoint(ck)
    lm = build_lm(cfg, ck["extra"]["codebook_size"], ck["extra"]["num_tokens"]).to(device)
    lm.load_state_dict(ck["ema"])
    return lm.eval().requires_grad_(False)


def train_uvim(cfg: UViMConfig, out: str, seed: int, resume: bool, ctx: Ctx, preset: str | None = None) -> dict | None:
    """Both stages in OUT/stage1 and OUT/lm, then the evaluation (rank 0): metrics.json, grid.png."""
    from .uvim_eval import evaluate_uvim

    t0 = time.time()
    s1_dir, lm_dir = os.path.join(out, "stage1"), os.path.join(out, "lm")
    run_stage(StageOneStage(cfg, seed), cfg, s1_dir, seed, resume, ctx, preset)
    t1 = time.time()
    run_stage(LMStage(cfg, seed, s1_dir), cfg, lm_dir, seed, resume, ctx, preset)
    t2 = time.time()
    if not ctx.is_main:
        return None
    metrics = evaluate_uvim(s1_dir, lm_dir, cfg, seed, ctx.device, os.path.join(out, "grid.png"))
    metrics |= {"seed": seed, "preset": preset, "config": dataclasses.asdict(cfg),
                "stage_seconds": {"stage1": t1 - t0, "lm": t2 - t1, "eval": time.time() - t2},
                "seconds": time.time() - t0}
    atomic_write(os.path.join(out, "metrics.json"), lambda f: json.dump(metrics, f, indent=1), mode="w")
    return metrics


def _resolve(args) -> tuple[UViMConfig, int]:
    """The run's config and seed; on --resume, the stage-I checkpoint's, with only RESUME_MUTABLE keys changeable."""
    levels = [int(v) for v in args.levels.split(",")] if args.levels else None
    cfg = make_uvim_config(args.preset, args.set, task=args.task, quantizer=args.quantizer, levels=levels)
    latest = latest_checkpoint(os.path.join(args.out, "stage1")) if args.resume else None
    if latest is None:
        return cfg, args.seed or 0
    ck = load_checkpoint(latest, StageOneStage.name)
    saved = config_from_checkpoint(ck)
    given = {k: getattr(cfg, k) for k in RESUME_MUTABLE if any(s.startswith(k + "=") for s in args.set)}
    bad = [f"{k}: checkpoint {getattr(saved, k)!r}, given {getattr(cfg, k)!r}" for k in ("task", "quantizer")
           if getattr(saved, k) != getattr(cfg, k)]
    if bad:
        raise ConfigError("--resume: flags conflict with the checkpoint: " + "; ".join(bad))
    return dataclasses.replace(saved, **given), int(ck["seed"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsq-train uvim", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=uvim_tasks.TASKS, required=True)
    p.add_argument("--out", required=True, help="run folder (stage1/, lm/, metrics.json, grid.png)")
    p.add_argument("--quantizer", choices=QUANTIZERS, default=None, help="default fsq")
    p.add_argument("--preset", choices=sorted(UVIM_PRESETS), default="default")
    p.add_argument("--levels", default=None, help=f"FSQ levels, e.g. 5,5,5 (default per task: {TASK_LEVELS})")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue both stages from their latest checkpoints")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a UViMConfig field")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, seed = _resolve(args)
    except ConfigError as e:
        print(f"fsq-train uvim: error: {e}", file=sys.stderr, flush=True)
        return 2
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    ctx = setup_distributed(None if args.device == "auto" else args.device)
    try:
        metrics = train_uvim(cfg, args.out, seed, args.resume, ctx, args.preset)
    except (CheckpointError, RunExistsError, FileNotFoundError) as e:
        print(f"fsq-train uvim: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        cleanup_distributed()
    if metrics is not None:
        from .uvim_eval import summary

        print(summary(metrics), flush=True)
    return 0
