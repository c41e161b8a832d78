"""VQGAN-style convolutional image tokenizer with FSQ in the bottleneck.

Encoder: conv_in -> per level (num_res_blocks ResBlocks, then a stride-2 downsample except at the
last level) -> mid ResBlock -> GroupNorm/SiLU -> conv to len(levels) * num_codebooks channels.
FSQ quantizes those channels (channel-first, no projections). The decoder mirrors the encoder
with nearest-neighbour upsampling. Images are in [-1, 1] inside the model.

The discriminator lives in models/discriminator.py, the losses in models/losses.py. An export
(``fsq-train export``) loads back with ``FSQTokenizer.from_pretrained(DIR)`` (models/pretrained.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .. import FSQ
from ..reference import MAX_MATERIALIZED_CODEBOOK
from .pretrained import PretrainedError, load_exported_state, read_pretrained
from .vq import VectorQuantizer

__all__ = ["ResBlock", "Encoder", "Decoder", "FSQTokenizer", "group_norm"]


def group_norm(c: int) -> nn.GroupNorm:
    groups = math.gcd(32, c)
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
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
        self.norm_out = group_norm(cin)
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
        self.norm_out = group_norm(cin)
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
                 vq_beta: float = 0.25, backend: str = "auto"):
        super().__init__()
        self.levels = list(levels)
        # Everything that fixes the architecture (the export's config.json); the backend does not.
        self.architecture = dict(levels=self.levels, channels=channels, channel_mult=list(channel_mult),
                                 num_res_blocks=num_res_blocks, in_channels=in_channels, num_codebooks=num_codebooks,
                                 quantizer=quantizer, vq_dim=vq_dim, vq_ema=vq_ema, vq_beta=vq_beta)
        if quantizer == "fsq":
            z_channels = len(self.levels) * num_codebooks
            # The fused histogram gives the training loop its per-batch usage (no second pass).
            track = math.prod(self.levels) <= MAX_MATERIALIZED_CODEBOOK
            self.quantizer = FSQ(self.levels, num_codebooks=num_codebooks, channel_first=True, backend=backend,
                                 track_usage=track)
            self.architecture["variant"] = self.quantizer.variant
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

    @classmethod
    def from_pretrained(cls, directory: str, map_location="cpu", backend: str = "auto") -> "FSQTokenizer":
        """The tokenizer of an ``fsq-train export`` folder (config.json + model.safetensors), in eval
        mode. A missing, corrupted or mismatched file raises PretrainedError naming it."""
        arch, state = read_pretrained(directory, "fsq_tokenizer", map_location)
        variant = arch.pop("variant", None)
        model = cls(**arch, backend=backend)
        if variant is not None and model.architecture.get("variant") != variant:
            raise PretrainedError(f"{directory}/config.json: FSQ variant {variant!r} is not the tokenizer's "
                                  f"{model.architecture.get('variant')!r}")
        return load_exported_state(model, state, directory)

