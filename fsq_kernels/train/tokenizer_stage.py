"""Stage 1: the FSQ (or VQ) image tokenizer, with optional perceptual and PatchGAN losses."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.discriminator import PatchDiscriminator
from ..models.losses import VGGPerceptualLoss, adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from ..models.tokenizer import FSQTokenizer
from .batches import batch_stream, load_data, to_model_layout
from .config import Config
from .distributed import Ctx
from .loading import build_tokenizer
from .metrics import code_counts, psnr, usage_and_perplexity
from .runner import Parts, Stage, run_stage
from .state import LRLambda, autocast_ctx, optimizer_step

__all__ = ["TokenizerStage", "train_tokenizer", "evaluate_tokenizer"]


@torch.no_grad()
def evaluate_tokenizer(tok: FSQTokenizer, val, cfg: Config, device: torch.device, limit: int | None = None,
                       batch: int = 250) -> dict:
    """Held-out PSNR (images in [0, 1], mean over images), codebook usage and code perplexity,
    streamed `batch` images at a time."""
    n = len(val) if limit is None else min(limit, len(val))
    counts = torch.zeros(tok.codebook_size, dtype=torch.float64)
    psnrs = []
    was_training = tok.training
    tok.eval()
    for i in range(0, n, batch):
        x, _ = val.batch(torch.arange(i, min(i + batch, n)))
        x = x.to(device)
        rec, ind = tok(to_model_layout(x * 2 - 1, cfg.channels_last))
        psnrs.append(psnr(((rec.float() + 1) / 2).clamp(0, 1), x).cpu())
        counts += code_counts(ind, tok.codebook_size)
    tok.train(was_training)
    usage, perplexity = usage_and_perplexity(counts)
    return {"psnr": float(torch.cat(psnrs).mean()), "codebook_usage": usage, "perplexity": perplexity,
            "num_images": n}


class TokenizerStage(Stage):
    name = "tokenizer"
    bar_fields = {"loss": ".4f", "train_psnr": ".2f"}

    def __init__(self, cfg: Config, seed: int):
        self.cfg, self.seed = cfg, seed
        self.total_steps = cfg.tok_steps

    def setup(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.train_ds, self.val_ds = load_data(self.cfg, self.seed)

    def make_model(self) -> FSQTokenizer:
        model = build_tokenizer(self.cfg).to(self.ctx.device)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def build(self, ctx: Ctx) -> Parts:
        cfg = self.cfg
        model = self.make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.tok_lr, betas=tuple(cfg.tok_betas),
                                weight_decay=cfg.tok_weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, LRLambda(cfg.tok_steps, cfg.warmup_steps, cfg.min_lr_ratio))
        parts = Parts(model, opt, sched)
        if cfg.disc_start >= 0:
            disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers).to(ctx.device)
            if cfg.channels_last:
                disc.to(memory_format=torch.channels_last)
            parts.extras["disc"] = disc
            parts.extra_optimizers["disc_optimizer"] = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr,
                                                                         betas=(0.5, 0.9), weight_decay=0.0)
        self.perceptual = VGGPerceptualLoss(cfg.perceptual_weights).to(ctx.device) if cfg.perceptual_weights else None
        return parts

    def batches(self, start: int):
        cfg = self.cfg
        return batch_stream(self.train_ds, cfg.tok_batch, self.seed, start, cfg.tok_steps, self.ctx, cfg.num_workers)

    def step(self, parts: Parts, step: int, batch) -> dict:
        cfg, device = self.cfg, self.ctx.device
        x = to_model_layout(batch[0].to(device, non_blocking=True) * 2 - 1, cfg.channels_last)
        disc = parts.extras.get("disc")
        gan_on = disc is not None and step >= cfg.disc_start
        with autocast_ctx(cfg.precision, device):
            rec, _ = parts.ddp(x)
            rec = rec.float()
            rec_l = reconstruction_loss(rec, x, cfg.rec_loss)
            loss = rec_total = rec_l
            logs = {"rec_loss": rec_l.detach()}
            if self.perceptual is not None:
                p_l = self.perceptual(rec, x)
                loss = rec_total = rec_total + cfg.perceptual_weight * p_l
                logs["perceptual_loss"] = p_l.detach()
            if gan_on:
                g_l = hinge_g_loss(disc(rec))  # the raw module: its grads are discarded below
                w = adaptive_weight(rec_total, g_l, parts.model.decoder.last_layer) * cfg.disc_weight
                loss = loss + w * g_l
                logs |= {"g_loss": g_l.detach(), "adaptive_weight": w}
            aux = getattr(parts.model.quantizer, "aux_loss", None)  # VQ: codebook + commitment loss; FSQ: none
            if aux is not None:
                loss = loss + aux
                logs["vq_loss"] = aux.detach()
        logs |= _train_batch_usage(parts.model.quantizer)
        gnorm = optimizer_step(loss, parts.model.parameters(), parts.optimizer, cfg.grad_clip, parts.scheduler)
        if gan_on:
            d_logs = self._disc_step(parts, x, rec)
            logs |= d_logs
        return {"loss": loss.detach(), "grad_norm": gnorm, "train_psnr": _batch_psnr(rec, x)} | logs

    def _disc_step(self, parts: Parts, x: Tensor, rec: Tensor) -> dict:
        cfg = self.cfg
        with autocast_ctx(cfg.precision, self.ctx.device):
            logits = parts.ddp_extras["disc"](to_model_layout(torch.cat([x, rec.detach()]), cfg.channels_last))
            d_l = hinge_d_loss(*logits.float().chunk(2))
        optimizer_step(d_l, parts.extras["disc"].parameters(), parts.extra_optimizers["disc_optimizer"], cfg.grad_clip)
        return {"d_loss": d_l.detach()}

    def evaluate(self, model) -> dict:
        m = evaluate_tokenizer(model, self.val_ds, self.cfg, self.ctx.device, limit=500)
        return {"val_psnr": m["psnr"], "val_codebook_usage": m["codebook_usage"]}


def _train_batch_usage(quantizer) -> dict:
    """Codebook usage and perplexity of this training batch, from the FSQ forward's fused
    histogram (tensors: no host sync here), then reset for the next batch. Held-out evaluation
    keeps its own exact count."""
    if not getattr(quantizer, "track_usage", False):
        return {}
    logs = {"train_codebook_usage": quantizer.usage().mean(), "train_perplexity": quantizer.perplexity().mean()}
    quantizer.reset_usage()
    return logs


def _batch_psnr(rec: Tensor, x: Tensor) -> Tensor:
    """PSNR of the whole training batch (one MSE over every pixel), images mapped back to [0, 1]."""
    mse = (((rec.detach() + 1) / 2).clamp(0, 1) - (x + 1) / 2).pow(2).mean().clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def train_tokenizer(cfg: Config, out: str, seed: int, resume: bool, ctx: Ctx, preset: str | None = None) -> str:
    """Train the tokenizer stage in `out`; returns the final checkpoint's path."""
    return run_stage(TokenizerStage(cfg, seed), cfg, out, seed, resume, ctx, preset)
