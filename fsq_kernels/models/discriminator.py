"""PatchGAN discriminator of the tokenizer's adversarial loss (the losses are in models/losses.py)."""

from __future__ import annotations

from torch import Tensor, nn

from .tokenizer import group_norm

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN NLayerDiscriminator) with GroupNorm instead of BatchNorm, so it
    behaves the same under DDP and at any batch size."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            cn = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, cn, 4, stride, 1, bias=False), group_norm(cn), nn.LeakyReLU(0.2)]
            c = cn
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
