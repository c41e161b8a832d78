"""A small CNN classifier trained locally (offline) on the same data, used as the feature space of
the Frechet distance (fsq_kernels/train/metrics.py) and as the judge of class-conditional samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SmallClassifier", "random_blur"]


class SmallClassifier(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, feature_dim: int = 64):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(in_channels, width), nn.MaxPool2d(2), block(width, 2 * width),
                                  nn.MaxPool2d(2), block(2 * width, 4 * width))
        self.fc = nn.Linear(4 * width, feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x in [0, 1] (B, 3, H, W) -> features (B, feature_dim)."""
        h = self.body(x * 2.0 - 1.0)
        return F.silu(self.fc(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


def random_blur(x: Tensor, max_sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur with a per-image sigma ~ U(0, max_sigma) px (7-tap separable, edges replicated).

    The judge's training augmentation: generated and reconstructed images are softer than the real
    ones, and a judge trained on sharp images only is unstable on them."""
    b, c, h, w = x.shape
    sigma = torch.rand(b, generator=generator).mul_(max_sigma).clamp_(min=1e-3).to(x.device)
    taps = torch.arange(-3, 4, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, 7)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)
