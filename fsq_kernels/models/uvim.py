"""UViM stage I (Kolesnikov et al., 2022, arXiv 2205.10337) with a discrete guiding code.

A base model f(x, z) predicts the dense output from the image x and a short code z; a restricted
oracle Omega(y, x) sees the target y and the image and writes z on a small grid, through a
quantizer: FSQ, UViM's VQ (``UViMVectorQuantizer``) or the plain VQ baseline (models/vq.py).

Code dropout (UViM): per example thr ~ U(0, 1); token j is kept iff importance_j > thr with
importance = linspace(1, 0, n + 2)[1:-1], so the number kept is uniform on {0, ..., n}; the kept
mask is then permuted at random over the positions. FSQ's all-zero vector is a real codeword, so
a dropped token is not just zeroed: the base model also reads a mask channel (1 = kept).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import FSQ
from .vq import VectorQuantizer

__all__ = ["QUANTIZERS", "code_dropout", "BaseUNet", "Oracle", "UViMVectorQuantizer", "build_quantizer", "StageOne"]

QUANTIZERS = ("fsq", "vq-uvim", "vq")


def code_dropout(batch: int, grid: tuple[int, int], generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """Kept-token mask (batch, h, w) float, 1 = kept, drawn as UViM's code dropout."""
    n = grid[0] * grid[1]
    importance = torch.linspace(1.0, 0.0, n + 2)[1:-1]
    thr = torch.rand(batch, 1, generator=generator)
    keep = (importance[None, :] > thr).float()
    perm = torch.rand(batch, n, generator=generator).argsort(1)  # an independent permutation per example
    return keep.gather(1, perm).view(batch, *grid).to(device)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class BaseUNet(nn.Module):
    """f(x, z): a small U-Net (32 -> 16 -> 8 and back, additive skips) whose 8x8 bottleneck adds
    the code.

    The code arrives as (B, code_dim, h, w) with a kept mask (B, h, w); both are read by a 1x1 conv
    and upsampled (nearest) to the bottleneck grid. About 217k parameters at width 32."""

    def __init__(self, x_channels: int, out_channels: int, code_dim: int, width: int = 32):
        super().__init__()
        w1, w2 = width, 2 * width
        self.enc1 = _block(x_channels, w1)
        self.enc2 = _block(w1, w2, 2)
        self.enc3 = _block(w2, w2, 2)
        self.code_in = nn.Conv2d(code_dim + 1, w2, 1)
        self.mid = nn.Sequential(_block(w2, w2), _block(w2, w2))
        self.dec2 = nn.Sequential(_block(w2, w2), _block(w2, w2))
        self.up1 = nn.Conv2d(w2, w1, 1)
        self.dec1 = _block(w1, w1)
        self.head = nn.Conv2d(w1, out_channels, 3, padding=1)

    def encode(self, x: Tensor, codes: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The skips (h1 at S, h2 at S/2) and the bottleneck after the code (2*width, S/4, S/4)."""
        h1 = self.enc1(x)
        h2 = self.enc2(h1)
        h3 = self.enc3(h2)
        z = self.code_in(torch.cat([codes * keep[:, None], keep[:, None]], 1))
        return h1, h2, self.mid(h3 + F.interpolate(z, size=h3.shape[-2:], mode="nearest"))

    def forward(self, x: Tensor, codes: Tensor, keep: Tensor) -> Tensor:
        h1, h2, h = self.encode(x, codes, keep)
        h = self.dec2(F.interpolate(h, scale_factor=2.0, mode="nearest") + h2)
        h = self.dec1(F.interpolate(self.up1(h), scale_factor=2.0, mode="nearest") + h1)
        return self.head(h)


class Oracle(nn.Module):
    """Omega(y, x): three stride-2 convs on concat(y, x) down to (B, code_dim, S/8, S/8)."""

    def __init__(self, y_channels: int, x_channels: int, code_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(y_channels + x_channels, width, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * width, code_dim, 3, 2, 1))

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        return self.net(torch.cat([y, x], 1))


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class UViMVectorQuantizer(nn.Module):
    """VQ as UViM trains it: inputs standardised per vector, L2-normalised codewords (the
    discounted sum of assigned vectors over the discounted count), an EMA dictionary with
    `decay`, no commitment or codebook loss, and while any discounted count is below `min_count`,
    the most-used codeword is split into the rarest one (copied with a multiplicative perturbation
    of +-`perturb`, counts and sums halved between the two). Channel-first (B, dim, ...).

    Splits draw their perturbation from a generator seeded with (`seed`, number of splits so
    far), so every DDP rank (which sees the same all-reduced statistics) splits identically."""

    def __init__(self, codebook_size: int, dim: int, *, decay: float = 0.99, min_count: float = 0.1,
                 perturb: float = 1e-3, seed: int = 0):
        super().__init__()
        if codebook_size < 2 or dim < 2:
            raise ValueError(f"UViMVectorQuantizer: codebook_size and dim must be >= 2; got {codebook_size}, {dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"UViMVectorQuantizer: decay must be in (0, 1); got {decay}")
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.min_count, self.perturb, self.seed = decay, min_count, perturb, seed
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("dictionary", torch.randn(codebook_size, dim, generator=g) / codebook_size ** 0.5)
        self.register_buffer("counts", torch.ones(codebook_size))
        self.register_buffer("num_splits", torch.zeros((), dtype=torch.long))
        self.aux_loss = torch.zeros(())

    def codewords(self) -> Tensor:
        e = self.dictionary / self.counts[:, None]
        return F.normalize(e, dim=-1)

    @torch.no_grad()
    def split_rare(self) -> int:
        """Split the most-used codeword into the rarest while any count < min_count; returns the
        number of splits made."""
        made = 0
        while bool((self.counts < self.min_count).any()) and made < self.codebook_size:
            i_max, i_min = int(self.counts.argmax()), int(self.counts.argmin())
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.num_splits))
            noise = torch.empty(self.dim).uniform_(1 - self.perturb, 1 + self.perturb, generator=g)
            self.dictionary[i_min] = self.dictionary[i_max] * noise.to(self.dictionary) / 2
            self.dictionary[i_max] /= 2
            self.counts[i_min] = self.counts[i_max] / 2
            self.counts[i_max] /= 2
            self.num_splits += 1
            made += 1
        return made

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(f"UViMVectorQuantizer: z must have dim={self.dim} channels on dim 1; got {tuple(z.shape)}")
        x = z.movedim(1, -1).float()
        shape = x.shape
        flat = x.reshape(-1, self.dim)
        flat = (flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
        e = self.codewords()
        # all codewords have unit norm, so the nearest one is the one of largest dot product
        indices = (flat.detach() @ e.t()).argmax(1)
        quantized = e[indices]
        if self.training:
            with torch.no_grad():
                counts = _all_reduce_sum(torch.bincount(indices, minlength=self.codebook_size).float())
                sums = _all_reduce_sum(torch.zeros_like(self.dictionary).index_add_(0, indices, flat.detach()))
                self.counts.mul_(self.decay).add_(counts)
                self.dictionary.mul_(self.decay).add_(sums)
                self.split_rare()
        out = flat + (quantized - flat).detach()  # straight-through
        out = out.view(shape).movedim(-1, 1).to(z.dtype)
        return out, indices.view(shape[:-1])

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return self.codewords()[indices.long()].movedim(-1, 1)


def build_quantizer(kind: str, levels: list[int], vq_dim: int = 16, vq_decay: float = 0.99,
                    vq_min_count: float = 0.1, seed: int = 0) -> tuple[nn.Module, int, int]:
    """(quantizer, code_dim, codebook_size) for `kind` in QUANTIZERS; both VQs get prod(levels) codes.

    FSQ quantizes len(levels) channels directly (no projection); the VQs quantize vq_dim channels."""
    size = 1
    for lv in levels:
        size *= int(lv)
    if kind == "fsq":
        return FSQ(list(levels), channel_first=True), len(levels), size
    if kind == "vq-uvim":
        return UViMVectorQuantizer(size, vq_dim, decay=vq_decay, min_count=vq_min_count, seed=seed), vq_dim, size
    if kind == "vq":
        return VectorQuantizer(size, vq_dim, channel_first=True), vq_dim, size
    raise ValueError(f"quantizer must be one of {list(QUANTIZERS)}; got {kind!r}")


class StageOne(nn.Module):
    """Oracle + quantizer + base model. forward(x, y_enc) trains with code dropout and returns
    (base output, code indices); `encode`, `decode` and `codes` serve inference."""

    def __init__(self, x_channels: int, y_channels: int, out_channels: int, quantizer: str, levels: list[int],
                 width: int = 32, oracle_width: int = 32, vq_dim: int = 16, vq_decay: float = 0.99,
                 vq_min_count: float = 0.1, seed: int = 0):
        super().__init__()
        self.quantizer_kind = quantizer
        self.quantizer, code_dim, self.codebook_size = build_quantizer(
            quantizer, levels, vq_dim, vq_decay, vq_min_count, seed)
        self.code_dim = code_dim
        self.oracle = Oracle(y_channels, x_channels, code_dim, oracle_width)
        self.base = BaseUNet(x_channels, out_channels, code_dim, width)

    @property
    def aux_loss(self) -> Tensor:
        return getattr(self.quantizer, "aux_loss", torch.zeros(()))

    def encode(self, x: Tensor, y_enc: Tensor) -> tuple[Tensor, Tensor]:
        """(codes (B, code_dim, h, w), indices (B, h, w) int64)."""
        codes, indices = self.quantizer(self.oracle(y_enc, x))
        return codes, indices.long()

    def codes(self, indices: Tensor) -> Tensor:
        return self.quantizer.indices_to_codes(indices).float()

    def _no_code(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, h = x.shape[0], x.shape[-1] // 8
        return x.new_zeros(b, self.code_dim, h, h), x.new_zeros(b, h, h)

    def decode(self, x: Tensor, codes: Tensor | None, keep: Tensor | None = None) -> Tensor:
        """f(x, z); codes None = no code (every token dropped)."""
        if codes is None:
            codes, keep = self._no_code(x)
        elif keep is None:
            keep = codes.new_ones(codes.shape[0], *codes.shape[2:])
        return self.base(x, codes, keep)

    def image_features(self, x: Tensor) -> Tensor:
        """What the base model makes of x alone: its bottleneck with no code, (B, 2*width, S/4, S/4).
        Stage II can condition the language model on these (``lm_input="features"``)."""
        return self.base.encode(x, *self._no_code(x))[2]

    def forward(self, x: Tensor, y_enc: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        codes, indices = self.encode(x, y_enc)
        keep = code_dropout(codes.shape[0], tuple(codes.shape[2:]), generator, codes.device)
        return self.decode(x, codes, keep), indices
