"""The FSQ module: vector-quantize-pytorch's FSQ interface on top of the op layer."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import ops, reference

__all__ = ["FSQ", "autocast_device_type"]


def autocast_device_type(z: Tensor) -> str:
    """The device type to switch autocast off for (autocast knows only a few device types)."""
    return z.device.type if z.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"

class FSQ(nn.Module):
    """Finite Scalar Quantization layer (Mentzer et al., 2023).

    Constructor arguments are vector-quantize-pytorch's, with the same meaning, plus:
      variant: "paper" (default; the paper's appendix code), "atanh" (vector-quantize-pytorch,
        Cosmos), "symmetric" (arXiv 2411.19842) or "ifsq" (arXiv 2601.17124: tanh(0.8 z) (L-1)/2,
        odd levels only). preserve_symmetry=True selects "symmetric".
      backend: "auto", "reference", "cpp", "cuda" or "triton" (see fsq_kernels.available_backends()).
      dither: the training noise (docs/dither.md), drawn inside the quantize kernel: "peer" (default;
        vector-quantize-pytorch's noise_dropout: each element, with probability noise_dropout,
        gets clamp(code + U(-1/2, 1/2), -1, 1)) or "taae" (stable-audio-tools' DitheredFSQ: per
        batch element, tanh(z) + U(-1/2, 1/2) * 2/(L-1) with probability 1 - noise_dropout, else
        tanh(z) or the code; always on in training). Both need the "symmetric" variant; indices
        always describe the noiseless code. The noise comes from the device's torch generator
        (torch.manual_seed reproduces it).
      track_usage: accumulate, in training mode, a per-code histogram of the indices, counted by
        the quantize kernel in the same pass (no host sync per step; codebooks up to 2^24 codes):
        `usage_counts` (num_codebooks, codebook_size), `usage()`, `perplexity()`, `reset_usage()`.

    forward(z) -> (out, indices). z is channel-last (..., dim), or (B, dim, ...) when
    channel_first=True. The quantizer always computes in float32 (float64 for float64 input)
    with autocast off, so indices are exact whatever the input dtype; force_quantization_f32 and
    allowed_dtypes are accepted for compatibility and change nothing about that.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        *,
        variant: str | None = None,
        backend: str = "auto",
        dither: str = "peer",
        track_usage: bool = False,
    ):
        super().__init__()
        caller = "FSQ"
        levels = ops.validate_levels(levels, caller)
        if variant is None:
            variant = "symmetric" if preserve_symmetry else "paper"
        elif preserve_symmetry and variant != "symmetric":
            raise ValueError(f"{caller}: preserve_symmetry=True selects variant 'symmetric'; got variant={variant!r}")
        if variant not in reference.VARIANTS:
            raise ValueError(f"{caller}: variant must be one of {list(reference.VARIANTS)}; got {variant!r}")
        if bound_hard_clamp and variant in ("paper", "ifsq"):
            raise ValueError(f"{caller}: bound_hard_clamp=True applies to the 'atanh' and 'symmetric' variants; got variant={variant!r}")
        ops._validate_variant(variant, False, caller, levels)  # 'ifsq': odd levels only
        if not 0.0 <= noise_dropout < 1.0:
            raise ValueError(f"{caller}: noise_dropout must lie in [0, 1); got {noise_dropout}")
        if noise_dropout > 0 and variant != "symmetric":
            raise ValueError(f"{caller}: noise_dropout > 0 needs the 'symmetric' variant (preserve_symmetry=True); got {variant!r}")
        if dither not in ("peer", "taae"):
            raise ValueError(f"{caller}: dither must be 'peer' or 'taae'; got {dither!r}")
        if dither == "taae" and (variant != "symmetric" or bound_hard_clamp):
            raise ValueError(f"{caller}: dither='taae' needs variant 'symmetric' without bound_hard_clamp; got "
                             f"variant={variant!r}, bound_hard_clamp={bound_hard_clamp}")
        if not isinstance(num_codebooks, int) or isinstance(num_codebooks, bool) or num_codebooks < 1:
            raise ValueError(f"{caller}: num_codebooks must be an int >= 1; got {num_codebooks!r}")
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError(f"{caller}: keep_num_codebooks_dim must be True with num_codebooks={num_codebooks} > 1")
        if backend not in ops.BACKENDS:
            raise ValueError(f"{caller}: backend must be one of {list(ops.BACKENDS)}; got {backend!r}")

        self.levels = levels
        self.variant = variant
        self.backend = backend
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.tensor(reference.basis(levels), dtype=torch.int64), persistent=False)

        self.scale = scale
        self.preserve_symmetry = variant == "symmetric"
        self.noise_dropout = noise_dropout
        self.dither = dither
        self.bound_hard_clamp = bound_hard_clamp
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = dim if dim is not None else self.effective_codebook_dim
        self.channel_first = channel_first
        self.return_indices = return_indices
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32
        self.codebook_size = math.prod(levels)
        self.track_usage = bool(track_usage)
        if self.track_usage:
            if not return_indices or self.codebook_size > reference.MAX_MATERIALIZED_CODEBOOK:
                raise ValueError(f"{caller}: track_usage=True needs return_indices=True and at most "
                                 f"{reference.MAX_MATERIALIZED_CODEBOOK} codes; got return_indices={return_indices}, "
                                 f"codebook_size={self.codebook_size}")
            self.register_buffer("usage_counts", torch.zeros(num_codebooks, self.codebook_size, dtype=torch.int64),
                                 persistent=False)

        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rotation = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, variant={self.variant!r}, hard_clamp={self.bound_hard_clamp}, "
            f"dim={self.dim}, num_codebooks={self.num_codebooks}, channel_first={self.channel_first}, "
            f"backend={self.backend!r}"
        )

    # -- codebook helpers -------------------------------------------------------------------

    @property
    def implicit_codebook(self) -> Tensor:
        """Every code, (codebook_size, codebook_dim); ValueError beyond 2^24 codes."""
        return reference.implicit_codebook(self.levels, self.variant).to(self._levels.device)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Index (...) -> per-channel level indices (..., codebook_dim)."""
        return reference.indices_to_level_indices(indices, self.levels)

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Codes, channel-last: (..., codebook_dim) -> (...), or (..., effective_codebook_dim) ->
        (..., num_codebooks); each snaps to the nearest grid point. Without projections this inverts
        indices_to_codes and forward (an orthogonal rotation is undone here). With projections
        project_out has no inverse: zhat are codes in the quantizer's space (grid values, before the
        rotation back and project_out), as vector-quantize-pytorch takes them."""
        channels = zhat.shape[-1] if isinstance(zhat, Tensor) and zhat.dim() > 0 else None
        num_codebooks = 1 if channels == self.codebook_dim else self.num_codebooks
        if self.orthogonal_rotation and not self.has_projections and channels == num_codebooks * self.codebook_dim:
            zhat = self._rotate(zhat, self.orthogonal_rot)  # shapes the op rejects reach it unrotated
        return ops.codes_to_indices(zhat, self.levels, variant=self.variant, num_codebooks=num_codebooks)

    def _decode(self, indices: Tensor, channel_first: bool) -> Tensor:
        if self.keep_num_codebooks_dim and self.num_codebooks == 1:
            indices = indices.squeeze(-1)
        codes = ops.indices_to_codes(
            indices, self.levels, variant=self.variant, num_codebooks=self.num_codebooks, backend=self.backend,
            dtype=self.project_out.weight.dtype if self.has_projections else torch.float32,
        )
        if self.orthogonal_rotation:
            codes = self._rotate(codes, self.orthogonal_rot.t())
        out = self.project_out(codes)
        return out.movedim(-1, 1) if channel_first else out

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices -> the module's output (projected out; channel-first when channel_first=True)."""
        return self._decode(indices, self.channel_first)

    # -- forward ----------------------------------------------------------------------------

    def _rotate(self, x: Tensor, matrix: Tensor) -> Tensor:
        x = x.unflatten(-1, (-1, self.codebook_dim))  # one codebook or all of them
        return (x @ matrix.to(x.dtype)).flatten(-2)

    def _forward(self, z: Tensor, channel_first: bool) -> tuple[Tensor, Tensor | None]:
        if self.has_projections and z.device != self.project_in.weight.device:
            raise ValueError(
                f"FSQ: z is on {z.device} but the module's parameters are on {self.project_in.weight.device}"
            )
        axis = 1 if channel_first else -1
        if z.dim() < (2 if channel_first else 1) or z.shape[axis] != self.dim:
            raise ValueError(
                f"FSQ: z must have dim={self.dim} channels on dim {axis}; got shape {tuple(z.shape)}"
            )
        # Without projections or rotation the kernels read channel-first z through its strides.
        direct = not (self.has_projections or self.orthogonal_rotation)
        x = z if direct else (z.movedim(1, -1) if channel_first else z)
        x = self.project_in(x)
        if self.orthogonal_rotation:
            x = self._rotate(x, self.orthogonal_rot)

        dither = self.dither if self.training and (self.noise_dropout > 0 or self.dither == "taae") else None
        track = self.track_usage and self.training
        args = dict(variant=self.variant, hard_clamp=self.bound_hard_clamp, channel_first=channel_first and direct,
                    num_codebooks=self.num_codebooks, backend=self.backend)
        with torch.autocast(autocast_device_type(x), enabled=False):
            if dither is not None or track:  # one fused launch: noise and histogram in the quantize kernel
                codes, indices, usage = ops.quantize_train(x, self.levels, dither=dither, dither_p=self.noise_dropout,
                                                           return_usage=track, **args)
                indices = indices if self.return_indices else None
                if track:
                    self.usage_counts.add_(usage)
            else:
                codes, indices = ops.quantize(x, self.levels, return_indices=self.return_indices, **args)
            if self.orthogonal_rotation:
                codes = self._rotate(codes, self.orthogonal_rot.t())

        out = self.project_out(codes)
        if channel_first and not direct:
            out = out.movedim(-1, 1)
        if indices is not None and self.keep_num_codebooks_dim and self.num_codebooks == 1:
            indices = indices.unsqueeze(-1)
        return out, indices

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return self._forward(z, self.channel_first)

    # -- usage statistics (track_usage=True) ----------------------------------------------------

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def _counts(self, all_reduce: bool) -> Tensor:
        counts = self.usage_counts
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)  # on request only, never per step
        return counts

    def usage(self, all_reduce: bool = False) -> Tensor:
        """Fraction of each codebook's codes seen since reset_usage(), (num_codebooks,) float32."""
        return ops.usage_fraction(self._counts(all_reduce))

    def perplexity(self, all_reduce: bool = False) -> Tensor:
        """exp(entropy) of each codebook's code distribution since reset_usage(), (num_codebooks,)."""
        return ops.perplexity(self._counts(all_reduce))
