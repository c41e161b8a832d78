"""The numbers both the training stages and the codebook study report, each derived here once:
codebook usage and perplexity from a code histogram, PSNR of images in [0, 1], the Frechet distance
of two feature sets."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["code_counts", "usage_and_perplexity", "psnr", "feature_stats", "frechet_distance"]


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """float64 histogram of code indices (any shape) over the codebook."""
    return torch.bincount(indices.flatten().long().cpu(), minlength=codebook_size).double()


def usage_and_perplexity(counts: Tensor) -> tuple[float, float]:
    """(fraction of the codebook used at least once, exp of the entropy of the code histogram)."""
    p = counts / counts.sum()
    nz = p[p > 0]
    return float((counts > 0).double().mean()), float(torch.exp(-(nz * nz.log()).sum()))


def psnr(rec: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1] (MAX = 1), shape (B,)."""
    mse = (rec - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def feature_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): the FID formula, computed with
    symmetric eigendecompositions (no complex sqrtm)."""
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_cross)
