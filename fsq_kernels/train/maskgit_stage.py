"""Stage 2: class-conditional MaskGIT on the tokenizer's tokens, or on pretokenized files
(``fsq-train tokenize``; then the tokenizer is not in memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.maskgit import MaskGIT, maskgit_loss, random_mask
from .batches import batch_indices, batch_stream, load_data, to_model_layout
from .config import Config
from .distributed import Ctx
from .loading import build_maskgit, load_tokenizer, token_meta, tokenize_dataset
from .runner import Parts, Stage, run_stage
from .state import LRLambda, autocast_ctx, optimizer_step

__all__ = ["MaskGITStage", "train_maskgit", "evaluate_maskgit", "DATA_KEYS"]

# The data of a MaskGIT run is its tokenizer's.
DATA_KEYS = ("data", "image_size", "num_train", "num_val", "shape_size", "shape_jitter", "skip_bad_images")
VAL_SEQUENCES = 500  # held-out sequences of the in-training evaluation


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
        with autocast_ctx(cfg.precision, device):
            logits = mg(inp.to(device), y.to(device)).float()
        m = mask.to(device)
        sel, tgt = logits[m], t.to(device)[m]
        tot_loss += float(F.cross_entropy(sel, tgt, reduction="sum"))
        tot_correct += float((sel.argmax(-1) == tgt).sum())
        tot_n += float(m.sum())
    mg.train(was_training)
    return {"val_accuracy": tot_correct / tot_n, "val_loss": tot_loss / tot_n}


class MaskGITStage(Stage):
    """`tokenizer`: a tokenizer run / checkpoint / export; or `codes`: a pretokenized folder."""

    name = "maskgit"
    bar_fields = {"loss": ".3f", "accuracy": ".3f"}

    def __init__(self, cfg: Config, seed: int, tokenizer: str | None = None, codes: str | None = None):
        if (tokenizer is None) == (codes is None):
            raise ValueError(f"MaskGITStage takes one of tokenizer= and codes=; got tokenizer={tokenizer!r}, "
                             f"codes={codes!r}")
        self.cfg, self.seed, self.tokenizer, self.codes = cfg, seed, tokenizer, codes
        self.total_steps = cfg.mg_steps

    def setup(self, ctx: Ctx) -> None:
        self.ctx = ctx
        if self.codes is not None:
            self._setup_codes()
        else:
            self._setup_tokenizer()

    def _setup_codes(self) -> None:
        from .pretokenize import as_long, read_codes

        codes = read_codes(self.codes)
        self.meta = codes.meta_for_maskgit()
        for k, v in codes.meta.get("data_config", {}).items():
            if k in DATA_KEYS:
                setattr(self.cfg, k, v)
        self.train_tokens, self.train_labels = codes.tokens, codes.labels
        n = min(VAL_SEQUENCES, codes.val_tokens.shape[0])
        self.val_tok, self.val_lab = as_long(codes.val_tokens[:n]), as_long(codes.val_labels[:n])
        self.tok = None

    def _setup_tokenizer(self) -> None:
        cfg, device = self.cfg, self.ctx.device
        self.tok, self.tcfg = load_tokenizer(self.tokenizer, device)
        for k in DATA_KEYS:
            setattr(cfg, k, getattr(self.tcfg, k))
        self.train_ds, val_ds = load_data(cfg, self.seed)
        # In-memory data is tokenized once up front; image folders (ImageNet) are tokenized per batch.
        self.train_tokens = (tokenize_dataset(self.tok, self.train_ds, self.tcfg.channels_last, device)
                             if hasattr(self.train_ds, "images") else None)
        self.train_labels = getattr(self.train_ds, "labels", None)
        n = min(VAL_SEQUENCES, len(val_ds))
        self.val_tok = tokenize_dataset(self.tok, val_ds, self.tcfg.channels_last, device, indices=range(n))
        self.val_lab = val_ds.labels[:n]  # without decoding the images
        self.meta = token_meta(self.tok, self.tcfg, self.train_ds.num_classes, self.train_ds.class_names)

    def make_model(self) -> MaskGIT:
        return build_maskgit(self.cfg, self.meta).to(self.ctx.device)

    def build(self, ctx: Ctx) -> Parts:
        cfg = self.cfg
        model = self.make_model()
        decay, no_decay = [], []
        for n_, p in model.named_parameters():
            (decay if p.dim() >= 2 and "emb" not in n_ else no_decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.mg_weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.mg_lr, betas=tuple(cfg.mg_betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, LRLambda(cfg.mg_steps, cfg.warmup_steps, cfg.min_lr_ratio))
        return Parts(model, opt, sched)

    def batches(self, start: int):
        cfg, ctx = self.cfg, self.ctx
        if self.train_tokens is None:  # image folder: encode each batch
            for x, y in batch_stream(self.train_ds, cfg.mg_batch, self.seed, start, cfg.mg_steps, ctx,
                                     cfg.num_workers):
                with torch.no_grad():
                    t = self.tok.encode(to_model_layout(x.to(ctx.device) * 2 - 1, self.tcfg.channels_last))[1]
                yield t.flatten(1).long(), y
            return
        n = self.train_tokens.shape[0]
        for s in range(start, cfg.mg_steps):
            i = batch_indices(n, cfg.mg_batch, self.seed, s, ctx.rank, ctx.world)
            if isinstance(self.train_tokens, Tensor):
                yield self.train_tokens[i], self.train_labels[i]
            else:  # memory-mapped pretokenized files
                from .pretokenize import as_long

                idx = i.numpy()
                yield as_long(self.train_tokens[idx]), as_long(self.train_labels[idx])

    def step(self, parts: Parts, step: int, batch) -> dict:
        cfg, device = self.cfg, self.ctx.device
        t, y = batch[0].to(device), batch[1].to(device)
        with autocast_ctx(cfg.precision, device):
            loss, info = maskgit_loss(parts.ddp, t, y, num_classes=self.meta["num_classes"],
                                      mask_id=self.meta["codebook_size"], min_mask_ratio=cfg.min_mask_ratio,
                                      label_smoothing=cfg.label_smoothing, class_drop=cfg.class_drop)
        gnorm = optimizer_step(loss, parts.model.parameters(), parts.optimizer, cfg.grad_clip, parts.scheduler)
        return {"loss": loss.detach(), "accuracy": info["accuracy"], "grad_norm": gnorm}

    def evaluate(self, model) -> dict:
        return evaluate_maskgit(model, self.val_tok, self.val_lab, self.cfg, self.ctx.device)

    def checkpoint_extra(self) -> dict:
        return {"extra": self.meta, "source": {"tokenizer": self.tokenizer, "codes": self.codes}}

    def config_extra(self) -> dict:
        return {"tokenizer": self.tokenizer, "codes": self.codes}


def train_maskgit(cfg: Config, out: str, seed: int, resume: bool, ctx: Ctx, tokenizer: str | None = None,
                  codes: str | None = None, preset: str | None = None) -> str:
    """Train the MaskGIT stage in `out` on a tokenizer's tokens or a pretokenized folder."""
    return run_stage(MaskGITStage(cfg, seed, tokenizer, codes), cfg, out, seed, resume, ctx, preset)
