"""ResidualFSQ and GroupedResidualFSQ: vector-quantize-pytorch's residual quantizers, every stage
fused into one kernel pass."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import ops, reference
from .fsq import FSQ, autocast_device_type

__all__ = ["GroupedResidualFSQ", "ResidualFSQ"]


def _shared_dropout_draw(device: torch.device, num_choices: int) -> Tensor:
    """A 0-d int64 tensor uniform on [0, num_choices), equal on every DDP rank, drawn on `device`.

    Each rank draws its own value and the values are summed modulo num_choices (uniform whenever
    one rank's draw is). The all_reduce runs on the device: nothing waits for the host, and a
    compiled or exported graph keeps the draw as data."""
    draw = torch.randint(0, num_choices, (), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(draw)
        draw = draw % num_choices
    return draw


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

    def _dropout_active_stages(self, seed: int | Tensor | None, device: torch.device) -> int | Tensor:
        """Stages kept by quantize dropout: the peer's draw for an int seed (a Python int, as the
        peer computes it); a device tensor for no seed or a tensor draw (see _shared_dropout_draw)."""
        low, multiple = self.quantize_dropout_cutoff_index, self.quantize_dropout_multiple_of
        if seed is None:
            seed = _shared_dropout_draw(device, self.num_quantizers - low)
        if isinstance(seed, Tensor):
            index = low + seed
        else:
            index = random.Random(seed).randrange(low, self.num_quantizers)
        if multiple != 1:
            index = ((index + 1 + multiple - 1) // multiple) * multiple - 1  # ceil((index + 1) / m) * m - 1
        if isinstance(index, Tensor):
            return (index + 1).clamp(max=self.num_quantizers)
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
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | Tensor | None = None
    ):
        direct = not self.has_projections
        channel_first = self.is_channel_first
        h = x if direct or not channel_first else x.movedim(1, -1)
        h = self.project_in(h)
        active = self.num_quantizers
        if self.training and self.quantize_dropout and torch.is_grad_enabled():
            active = self._dropout_active_stages(rand_quantize_dropout_fixed_seed, x.device)
        with torch.autocast(autocast_device_type(h), enabled=False):
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
        # One draw shared by every group, as the peer shares its seed; none when no group drops stages.
        dropping = self.training and torch.is_grad_enabled() and any(rvq.quantize_dropout for rvq in self.rvqs)
        seed = _shared_dropout_draw(x.device, self.rvqs[0].num_quantizers - self.rvqs[0].quantize_dropout_cutoff_index) if dropping else None
        outputs = [
            rvq(chunk, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))
        ]
        quantized, indices, *all_codes = zip(*outputs)
        result = (torch.cat(quantized, dim=self.split_dim), torch.stack(indices))
        return (*result, torch.stack(all_codes[0])) if return_all_codes else result
