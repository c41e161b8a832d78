"""The FSQ module: vector-quantize-pytorch's FSQ interface on top of the op layer."""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from torch import Tensor, nn

from . import ops, reference

__all__ = ["FSQ", "GroupedResidualFSQ", "ResidualFSQ"]


def _device_type(z: Tensor) -> str:
    return z.device.type if z.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


class FSQ(nn.Module):
    """Finite Scalar Quantization layer (Mentzer et al., 2023).

    Constructor arguments are vector-quantize-pytorch's, with the same meaning, plus:
      variant: "paper" (default; the paper's appendix code), "atanh" (vector-quantize-pytorch,
        Cosmos) or "symmetric" (arXiv 2411.19842). preserve_symmetry=True selects "symmetric".
      backend: "auto", "reference", "cpp", "cuda" or "triton" (see fsq_kernels.available_backends()).

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
        if bound_hard_clamp and variant == "paper":
            raise ValueError(f"{caller}: bound_hard_clamp=True applies to the 'atanh' and 'symmetric' variants; got variant='paper'")
        if not 0.0 <= noise_dropout < 1.0:
            raise ValueError(f"{caller}: noise_dropout must lie in [0, 1); got {noise_dropout}")
        if noise_dropout > 0 and variant != "symmetric":
            raise ValueError(f"{caller}: noise_dropout > 0 needs the 'symmetric' variant (preserve_symmetry=True); got {variant!r}")
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

        with torch.autocast(_device_type(x), enabled=False):
            codes, indices = ops.quantize(
                x, self.levels, variant=self.variant, hard_clamp=self.bound_hard_clamp,
                channel_first=channel_first and direct, num_codebooks=self.num_codebooks,
                return_indices=self.return_indices, backend=self.backend,
            )
            if self.training and self.noise_dropout > 0:
                codes = self._noise_dropout(codes)
            if self.orthogonal_rotation:
                codes = self._rotate(codes, self.orthogonal_rot.t())

        out = self.project_out(codes)
        if channel_first and not direct:
            out = out.movedim(-1, 1)
        if indices is not None and self.keep_num_codebooks_dim and self.num_codebooks == 1:
            indices = indices.unsqueeze(-1)
        return out, indices

    def _noise_dropout(self, codes: Tensor) -> Tensor:
        # arXiv 2411.19842: replace rounding by uniform noise on a random subset of elements.
        keep_mask = torch.full_like(codes, self.noise_dropout).bernoulli_().bool()
        noisy = codes + (torch.rand_like(codes) - 0.5)
        return torch.where(keep_mask, noisy, codes).clamp(-1.0, 1.0)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return self._forward(z, self.channel_first)


def _synced_random_seed(device: torch.device, max_size: int = 10_000) -> int:
    """A seed drawn on one device and summed across DDP ranks, so every rank drops the same stages."""
    seed = torch.randint(0, max_size, (), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(seed)
    return int(seed.item())


class ResidualFSQ(nn.Module):
    """Residual FSQ (vector-quantize-pytorch's ResidualFSQ, Algorithm 1 of arXiv 2107.03312).

    Every stage is a `symmetric` FSQ (hard clamp by default, after the soft clamp
    tanh(x / c) * c with c = 1 + 1/(L-1)) on residual / L^-s. All stages run in one fused kernel
    pass on the fused backends. forward(x) -> (quantized, indices[, all_codes]) with indices
    (..., num_quantizers), or (B, num_quantizers, ...) with is_channel_first=True.
    """

    def __init__(
        self,
        *,
        levels: Sequence[int],
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | Sequence[float] | Tensor | None = None,
        bound_hard_clamp: bool = True,
        backend: str = "auto",
        **fsq_kwargs,
    ):
        super().__init__()
        caller = "ResidualFSQ"
        levels = ops.validate_levels(levels, caller)
        if not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"{caller}: num_quantizers must be an int >= 1; got {num_quantizers!r}")
        if quantize_dropout_cutoff_index < 0:
            raise ValueError(f"{caller}: quantize_dropout_cutoff_index must be >= 0; got {quantize_dropout_cutoff_index}")
        codebook_dim = len(levels)
        dim = dim if dim is not None else codebook_dim
        self.levels = levels
        self.codebook_dim = codebook_dim
        self.dim = dim
        self.backend = backend
        self.is_channel_first = is_channel_first
        self.num_quantizers = num_quantizers
        self.has_projections = dim != codebook_dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        # One FSQ per stage, as the peer has (codebooks, state_dict layout); the forward fuses them.
        self.layers = nn.ModuleList(
            FSQ(levels, dim=codebook_dim, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp, backend=backend, **fsq_kwargs)
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size
        self.bound_hard_clamp = bound_hard_clamp
        self.register_buffer(
            "scales", torch.tensor(reference.residual_scales(levels, num_quantizers), dtype=torch.float32), persistent=False
        )
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError(f"{caller}: soft_clamp_input_value is set by bound_hard_clamp=True (c = 1 + 1/(L-1)); got {soft_clamp_input_value!r}")
            soft_clamp = reference.residual_soft_clamp(levels)
        elif soft_clamp_input_value is None:
            soft_clamp = None
        else:
            values = torch.as_tensor(soft_clamp_input_value, dtype=torch.float64).flatten().tolist()
            soft_clamp = values * codebook_dim if len(values) == 1 else values
        self.soft_clamp = None if soft_clamp is None else tuple(soft_clamp)
        self.register_buffer(
            "soft_clamp_input_value", None if soft_clamp is None else torch.tensor(soft_clamp, dtype=torch.float32), persistent=False
        )

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def _dropout_active_stages(self, seed: int | None, device: torch.device) -> int:
        if seed is None:
            seed = _synced_random_seed(device)
        index = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            index = math.ceil((index + 1) / multiple) * multiple - 1
        return min(index + 1, self.num_quantizers)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Indices as forward returns them, (B, ..., q) or (B, q, ...) with is_channel_first=True,
        -> every stage's scaled codes, channel-last (q, B, ..., d); index -1 gives zeros. Fewer
        stages (indices[..., :k], or indices[:, :k] channel-first) need quantize_dropout=True."""
        if self.is_channel_first:
            indices = indices.movedim(1, -1)
        given = indices.shape[-1]
        if given < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError(
                    f"ResidualFSQ: indices hold {given} of {self.num_quantizers} stages; reconstructing from fewer "
                    f"stages needs quantize_dropout=True"
                )
            indices = torch.nn.functional.pad(indices, (0, self.num_quantizers - given), value=-1)
        dropped = indices < 0
        codes = ops.indices_to_codes(
            indices.masked_fill(dropped, 0).movedim(-1, 0), self.levels, variant="symmetric", backend=self.backend
        )
        codes = codes * self.scales.view(self.num_quantizers, *([1] * (codes.dim() - 2)), self.codebook_dim)
        return codes.masked_fill(dropped.movedim(-1, 0).unsqueeze(-1), 0.0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Indices -> forward's quantized output (channel-first with is_channel_first=True)."""
        out = self.project_out(self.get_codes_from_indices(indices).sum(dim=0))
        return out.movedim(-1, 1) if self.is_channel_first else out

    def forward(
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None
    ):
        direct = not self.has_projections
        channel_first = self.is_channel_first
        h = x if direct or not channel_first else x.movedim(1, -1)
        h = self.project_in(h)
        active = self.num_quantizers
        if self.training and self.quantize_dropout and torch.is_grad_enabled():
            active = self._dropout_active_stages(rand_quantize_dropout_fixed_seed, x.device)
        with torch.autocast(_device_type(h), enabled=False):
            quantized, indices = ops.residual_quantize(
                h, self.levels, self.num_quantizers, hard_clamp=self.bound_hard_clamp, soft_clamp=self.soft_clamp,
                channel_first=channel_first and direct, active_stages=active, backend=self.backend,
            )
        quantized = self.project_out(quantized)
        if channel_first and not direct:
            quantized = quantized.movedim(-1, 1)
            indices = indices.movedim(-1, 1)
        if not return_all_codes:
            return quantized, indices
        return quantized, indices, self.get_codes_from_indices(indices)


class GroupedResidualFSQ(nn.Module):
    """vector-quantize-pytorch's GroupedResidualFSQ: the feature dim split into groups, one
    ResidualFSQ each; indices stacked (groups, ...)."""

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"GroupedResidualFSQ: dim={dim} must be divisible by groups={groups}")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualFSQ(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return torch.stack([rvq.get_codes_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return torch.cat([rvq.get_output_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)], dim=self.split_dim)

    def forward(self, x: Tensor, return_all_codes: bool = False):
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"GroupedResidualFSQ: x must have dim={self.dim} on dim {self.split_dim}; got shape {tuple(x.shape)}")
        seed = _synced_random_seed(x.device) if self.training else None
        outputs = [
            rvq(chunk, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))
        ]
        quantized, indices, *all_codes = zip(*outputs)
        result = (torch.cat(quantized, dim=self.split_dim), torch.stack(indices))
        return (*result, torch.stack(all_codes[0])) if return_all_codes else result
