"""Sampling and evaluation of trained stages: class-conditional samples, the judge classifier,
and every metric of the demo (OUT/metrics.json, reconstructions.png, samples.png, curves.png).
Held-out image folders are streamed in batches, never loaded whole."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.classifier import SmallClassifier, random_blur
from ..models.maskgit import MaskGIT, maskgit_sample
from ..models.tokenizer import FSQTokenizer
from .batches import load_data, to_model_layout
from .checkpoint import atomic_torch_save
from .config import Config
from .distributed import Ctx
from .figures import plot_curves, save_grid
from .loading import load_maskgit, load_tokenizer, tokenize_dataset
from .maskgit_stage import evaluate_maskgit
from .metrics import frechet_distance
from .state import autocast_ctx, lr_factor
from .tokenizer_stage import evaluate_tokenizer

__all__ = ["generate", "train_classifier", "classify", "run_sample", "run_eval"]

BATCH = 250


@torch.no_grad()
def generate(mg: MaskGIT, tok: FSQTokenizer, meta: dict, cfg: Config, labels: Tensor, device: torch.device,
             seed: int, batch: int = 100, cfg_scale: float | None = None) -> Tensor:
    """Class-conditional samples as images in [0, 1] (N, 3, H, W)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, w = meta["token_grid"]
    outs = []
    for i in range(0, labels.shape[0], batch):
        y = labels[i:i + batch].to(device)
        with autocast_ctx(cfg.precision, device):
            toks = maskgit_sample(mg, y, num_tokens=meta["num_tokens"], codebook_size=meta["codebook_size"],
                                  num_classes=meta["num_classes"], num_steps=cfg.decode_steps,
                                  choice_temperature=cfg.choice_temperature,
                                  cfg_scale=cfg.cfg_scale if cfg_scale is None else cfg_scale,
                                  temperature=cfg.sample_temperature, generator=g)
        img = tok.decode_indices(toks.view(-1, h, w))
        outs.append(((img.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(outs)


def train_classifier(cfg: Config, train_ds, seed: int, device: torch.device, path: str) -> SmallClassifier:
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
def classify(clf: SmallClassifier, images, device: torch.device, batch: int = 500) -> tuple[Tensor, Tensor, Tensor]:
    """(features, predicted classes, true labels or empty) of a (N, 3, H, W) tensor in [0, 1] or of a
    dataset, `batch` images at a time."""
    n = images.shape[0] if isinstance(images, Tensor) else len(images)
    feats, preds, labels = [], [], []
    for i in range(0, n, batch):
        if isinstance(images, Tensor):
            x = images[i:i + batch]
        else:
            x, y = images.batch(torch.arange(i, min(i + batch, n)))
            labels.append(y)
        f = clf.features(x.to(device))
        feats.append(f.cpu())
        preds.append(clf.out(f).argmax(-1).cpu())
    return torch.cat(feats), torch.cat(preds), torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def _sample_grid(imgs: Tensor, num_classes: int, per_class: int, path: str) -> None:
    show = min(per_class, 12)
    save_grid(imgs.view(num_classes, per_class, *imgs.shape[1:])[:, :show].reshape(-1, *imgs.shape[1:]), show, path)


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
    _sample_grid(imgs, meta["num_classes"], k, os.path.join(out, "samples.png"))
    return imgs


def _reconstructions(tok: FSQTokenizer, val_ds, tcfg: Config, device: torch.device, n: int) -> tuple[Tensor, Tensor]:
    """(first n held-out images, their reconstructions), both in [0, 1]."""
    x = val_ds.batch(torch.arange(n))[0]
    recs = []
    with torch.no_grad():
        for i in range(0, n, BATCH):
            r, _ = tok(to_model_layout(x[i:i + BATCH].to(device) * 2 - 1, tcfg.channels_last))
            recs.append(((r.float() + 1) / 2).clamp(0, 1).cpu())
    return x, torch.cat(recs)


def run_eval(out: str, tokenizer: str, maskgit: str, seed: int, ctx: Ctx, cfg_scale: float | None = None,
             sampling: dict | None = None) -> dict:
    """All metrics of the demo; writes OUT/reconstructions.png, samples.png, curves.png; returns them."""
    os.makedirs(out, exist_ok=True)
    dev = ctx.device
    tok, tcfg = load_tokenizer(tokenizer, dev)
    mg, mcfg, meta = load_maskgit(maskgit, dev)
    mcfg = dataclasses.replace(mcfg, **(sampling or {}))
    train_ds, val_ds = load_data(tcfg, seed)
    metrics: dict = {}
    metrics["tokenizer"] = evaluate_tokenizer(tok, val_ds, tcfg, dev)
    val_tok = tokenize_dataset(tok, val_ds, tcfg.channels_last, dev)
    metrics["maskgit"] = evaluate_maskgit(mg, val_tok, val_ds.labels, mcfg, dev) | {"num_sequences": len(val_ds)}

    # reconstructions of the first held-out images: a figure, and (below) what the judge makes of them
    n_rec = min(1000, len(val_ds))
    x, rec = _reconstructions(tok, val_ds, tcfg, dev, n_rec)
    shown = min(24, n_rec)
    per = 12 if shown >= 12 else shown
    rows = []  # originals (odd rows) over reconstructions (even rows)
    for i in range(0, shown - per + 1, per):
        rows += [x[i:i + per], rec[i:i + per]]
    save_grid(torch.cat(rows), per, os.path.join(out, "reconstructions.png"))

    # samples, judged by a classifier trained here on the real training images
    clf = train_classifier(mcfg, train_ds, seed, dev, os.path.join(out, "classifier.pt"))
    k = mcfg.samples_per_class
    c = meta["num_classes"]
    labels = torch.arange(c).repeat_interleave(k)
    imgs = generate(mg, tok, meta, mcfg, labels, dev, seed, cfg_scale=cfg_scale)
    _sample_grid(imgs, c, k, os.path.join(out, "samples.png"))
    n = labels.shape[0]
    f_s, pred, _ = classify(clf, imgs, dev)
    f_v, pred_v, lab_v = classify(clf, val_ds, dev)  # streamed: image folders are not loaded whole
    clf_val_acc = float((pred_v == lab_v).float().mean())
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
