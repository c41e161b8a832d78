"""Figures of a run: image grids and training curves (PNG, written atomically)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write
from .logs import read_jsonl

__all__ = ["save_grid", "plot_curves", "save_figure"]


def save_figure(fig, path: str, dpi: int = 90) -> None:
    """A matplotlib figure as a PNG at `path`, atomically; closes the figure."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)


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
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def plot_curves(tok_dir: str, mg_dir: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tk, mg = read_jsonl(os.path.join(tok_dir, "metrics.jsonl")), read_jsonl(os.path.join(mg_dir, "metrics.jsonl"))
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
    save_figure(fig, path)
