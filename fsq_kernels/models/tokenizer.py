"""VQGAN-style convolutional image tokenizer with FSQ in the bottleneck.

Encoder: conv_in -> per level (num_res_blocks ResBlocks, then a stride-2 downsample except at the
last level) -> mid ResBlock -> GroupNorm/SiLU -> conv to len(levels) * num_codebooks channels.
FSQ quantizes those channels (channel-first, no projections). The decoder mirrors the encoder
with nearest-neighbour upsampling. Images are in [-1, 1] inside the model.

Losses: L1 or L2 reconstruction, an optional perceptual (LPIPS-style, VGG16 features) loss whose
weights come only from a local file, and a PatchGAN discriminator with hinge loss and the VQGAN
adaptive weight (norm of the reconstruction gradient over the norm of the GAN gradient at the
decoder's last layer).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import FSQ
from .vq import VectorQuantizer

__all__ = [
    "ResBlock", "Encoder", "Decoder", "FSQTokenizer", "PatchDiscriminator", "VGGPerceptualLoss",
    "hinge_d_loss", "hinge_g_loss", "adaptive_weight", "reconstruction_loss",
]


def _norm(c: int) -> nn.GroupNorm:
    groups = math.gcd(32, c)
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # VQGAN's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        cin = channels
        for i, m in enumerate(channel_mult):
            cout = channels * m
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, cout))
                cin = cout
            if i != len(channel_mult) - 1:
                blocks.append(Downsample(cin))
        blocks.append(ResBlock(cin, cin))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    def __init__(self, out_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int):
        super().__init__()
        cin = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(cin, cin)]
        for i, m in reversed(list(enumerate(channel_mult))):
            cout = channels * m
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, cout))
                cin = cout
            if i != 0:
                blocks.append(Upsample(cin))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class FSQTokenizer(nn.Module):
    """Encoder -> FSQ -> decoder. ``forward(x)`` takes images in [-1, 1] (B, 3, H, W) and returns
    (reconstruction in [-1, 1] range, unclamped; indices (B, H/f, W/f)).

    ``quantizer="vq"`` puts the VQ baseline (models/vq.py) in the bottleneck instead, with as many
    codes as the FSQ level set has (prod(levels)) and ``vq_dim`` channels (0: len(levels), FSQ's
    width); its codebook + commitment loss of the last forward is ``self.quantizer.aux_loss``."""

    def __init__(self, levels: Sequence[int] = (8, 5, 5, 5), channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, in_channels: int = 3,
                 num_codebooks: int = 1, quantizer: str = "fsq", vq_dim: int = 0, vq_ema: bool = False,
                 vq_beta: float = 0.25):
        super().__init__()
        self.levels = list(levels)
        if quantizer == "fsq":
            z_channels = len(self.levels) * num_codebooks
            self.quantizer = FSQ(self.levels, num_codebooks=num_codebooks, channel_first=True)
        elif quantizer == "vq":
            if num_codebooks != 1:
                raise ValueError(f"quantizer='vq' takes num_codebooks=1; got {num_codebooks}")
            z_channels = vq_dim if vq_dim > 0 else len(self.levels)
            self.quantizer = VectorQuantizer(math.prod(self.levels), z_channels, beta=vq_beta, ema=vq_ema,
                                             channel_first=True)
        else:
            raise ValueError(f"quantizer must be 'fsq' or 'vq'; got {quantizer!r}")
        self.encoder = Encoder(in_channels, channels, channel_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(in_channels, channels, channel_mult, num_res_blocks, z_channels)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] -> (codes (B, d, h, w), indices (B, h, w))."""
        return self.quantizer(self.encoder(x))

    def decode_codes(self, codes: Tensor) -> Tensor:
        return self.decoder(codes)

    def decode_indices(self, indices: Tensor) -> Tensor:
        codes = self.quantizer.indices_to_codes(indices)
        return self.decoder(codes.to(self.decoder.conv_in.weight.dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        codes, indices = self.encode(x)
        return self.decoder(codes), indices


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
            layers += [nn.Conv2d(c, cn, 4, stride, 1, bias=False), _norm(cn), nn.LeakyReLU(0.2)]
            c = cn
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def reconstruction_loss(x: Tensor, y: Tensor, kind: str = "l1") -> Tensor:
    if kind == "l1":
        return (x - y).abs().mean()
    if kind == "l2":
        return (x - y).pow(2).mean()
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2'; got {kind!r}")


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's lambda = ||grad_L(rec)|| / (||grad_L(gan)|| + 1e-4), clamped, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


# VGG16 "features" indices (torchvision layout) and the ReLU outputs LPIPS uses.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class VGGPerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance on VGG16 features, loaded only from a local file.

    ``weights_path`` is a state dict saved with torch.save whose ``features.N.weight/bias`` keys
    follow torchvision's vgg16 layout (a full torchvision vgg16 state dict works; classifier keys
    are ignored). Optional ``lin{k}.weight`` keys (LPIPS's learned 1x1 heads, shape (1, C, 1, 1))
    are used when present; otherwise every channel weighs the same. Nothing is downloaded.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"perceptual loss weights file {weights_path!r} not found "
                                    "(the perceptual loss only reads a local file)") from e
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = self.load_state_dict(feats, strict=False).missing_keys
        if any(k.startswith("features.") for k in missing):
            raise ValueError(f"{weights_path!r} lacks VGG16 feature weights: missing {missing[:4]}...")
        chans = [64, 128, 256, 512, 512]
        self.lins = nn.ParameterList()
        for k, ch in enumerate(chans):
            w = state.get(f"lin{k}.weight", state.get(f"lin{k}.model.1.weight"))
            self.lins.append(nn.Parameter(w.reshape(1, ch, 1, 1).float() if w is not None else torch.ones(1, ch, 1, 1),
                                          requires_grad=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y in [-1, 1]; returns the mean distance (a scalar)."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = h.new_zeros(())
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                fx, fy = h.chunk(2)
                fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + ((fx - fy).pow(2) * self.lins[k]).sum(1).mean()
                k += 1
                if k == len(_LPIPS_TAPS):
                    break
        return total
