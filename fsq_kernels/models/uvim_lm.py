"""UViM stage II: a language model over the guiding code, conditioned on the image.

A conv stem turns x into a prefix of image tokens (an (S/4) x (S/4) grid: 64 tokens at 32x32),
or, with ``in_stride=1``, reads a feature map already on that grid (train/uvim.py passes the
frozen base model's no-code bottleneck: what f makes of x alone);
a transformer decoder runs over the code tokens in raster order with causal self-attention and
cross-attention to the prefix, and predicts each code index from the ones before it. The code grid
lies on the image (token j covers one cell of it), so the input at position j also gets the image
features of cell j (the stem's output average-pooled to the code grid): the decoder does not have
to learn from scratch which prefix tokens lie under which code token. Decoding is greedy or by
sampling at a temperature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CodeLM", "lm_loss"]


class CodeLM(nn.Module):
    """p(z | x) = prod_j p(z_j | z_<j, x) over `num_tokens` code indices in [0, vocab)."""

    def __init__(self, vocab: int, num_tokens: int, x_channels: int, width: int = 128, depth: int = 3,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0, in_stride: int = 4):
        super().__init__()
        if vocab < 2 or num_tokens < 1:
            raise ValueError(f"CodeLM: vocab must be >= 2 and num_tokens >= 1; got {vocab}, {num_tokens}")
        if in_stride not in (1, 4):
            raise ValueError(f"CodeLM: in_stride must be 4 (an image) or 1 (a feature map); got {in_stride}")
        self.vocab, self.num_tokens = vocab, num_tokens
        half = width // 2
        if in_stride == 4:  # an image: two stride-2 convs down to (S/4)^2 tokens
            self.stem = nn.Sequential(
                nn.Conv2d(x_channels, half, 3, 1, 1), nn.SiLU(),
                nn.Conv2d(half, width, 3, 2, 1), nn.SiLU(),
                nn.Conv2d(width, width, 3, 2, 1), nn.SiLU(),
                nn.Conv2d(width, width, 3, 1, 1))
        else:  # a feature map already at the token grid (the base model's no-code bottleneck)
            self.stem = nn.Sequential(
                nn.Conv2d(x_channels, width, 1), nn.SiLU(),
                nn.Conv2d(width, width, 3, 1, 1), nn.SiLU(),
                nn.Conv2d(width, width, 3, 1, 1))
        self.prefix_norm = nn.LayerNorm(width)
        side = math.isqrt(num_tokens)
        self.code_grid = (side, num_tokens // side)  # raster order over a square (or side x k) grid
        self.local = nn.Linear(width, width)  # image features of each code token's cell
        self.token_embed = nn.Embedding(vocab + 1, width)  # index `vocab` is the start token
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, heads, int(width * mlp_ratio), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", torch.triu(torch.full((num_tokens, num_tokens), float("-inf")), 1),
                             persistent=False)

    def prefix(self, x: Tensor) -> Tensor:
        """Image tokens (B, (S/4)^2, width), with a fixed 2-D sinusoidal position code."""
        return self.image(x)[0]

    def image(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(prefix (B, (S/4)^2, width), cell features (B, num_tokens, width))."""
        h = self.stem(x)
        b, c, gh, gw = h.shape
        prefix = self.prefix_norm(h.flatten(2).transpose(1, 2) + _sincos_2d(gh, gw, c, h.device, h.dtype))
        cells = self.local(F.adaptive_avg_pool2d(h, self.code_grid).flatten(2).transpose(1, 2))
        return prefix, cells

    def logits(self, image: tuple[Tensor, Tensor], tokens: Tensor) -> Tensor:
        """Teacher-forced logits (B, t, vocab) for the first t positions given tokens (B, t) and
        `image` = self.image(x)."""
        prefix, cells = image
        t = tokens.shape[1]
        start = tokens.new_full((tokens.shape[0], 1), self.vocab)
        inp = torch.cat([start, tokens[:, :t - 1]], 1) if t > 0 else start[:, :0]
        # input j predicts token j: it carries token j-1 and the image under cell j
        h = self.token_embed(inp) + self.pos_embed[:t] + cells[:, :t]
        h = self.decoder(h, prefix, tgt_mask=self.causal[:t, :t], tgt_is_causal=True)
        return self.head(self.norm(h))

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        """x (B, C, S, S), tokens (B, num_tokens) int -> logits (B, num_tokens, vocab)."""
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"CodeLM: tokens must have {self.num_tokens} positions; got {tuple(tokens.shape)}")
        return self.logits(self.image(x), tokens.long())

    @torch.no_grad()
    def generate(self, x: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Code indices (B, num_tokens): greedy when temperature == 0, else sampled at `temperature`."""
        if temperature < 0:
            raise ValueError(f"CodeLM.generate: temperature must be >= 0; got {temperature}")
        image = self.image(x)
        out = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
        for j in range(self.num_tokens):
            # t + 1 positions with a placeholder last token: position j sees only tokens < j
            logits = self.logits(image, torch.cat([out, out.new_zeros(x.shape[0], 1)], 1))[:, j].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = F.softmax(logits / temperature, -1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)
            out = torch.cat([out, nxt[:, None]], 1)
        return out


def lm_loss(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy in nats, next-token accuracy)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten().long())
    acc = (logits.argmax(-1) == tokens).float().mean()
    return ce, acc


def _sincos_2d(h: int, w: int, dim: int, device, dtype) -> Tensor:
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = [f(c.flatten()[:, None] * omega[None]) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    pe = torch.cat(parts, 1)
    if pe.shape[1] < dim:
        pe = F.pad(pe, (0, dim - pe.shape[1]))
    return pe.to(dtype) * (1.0 / math.sqrt(2))
