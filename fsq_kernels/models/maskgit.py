"""MaskGIT (Chang et al., 2022) over FSQ token indices, as in the FSQ paper's stage II.

- A bidirectional transformer reads [class token, t_1 .. t_N] where masked positions hold the mask
  token id (= codebook_size) and predicts a distribution over the codebook at every position.
- Training: r ~ U(0, 1), masked fraction = max(cos(pi/2 * r), min_mask_ratio) (0.45 in the FSQ
  paper), cross-entropy on masked positions only, label smoothing 0.1, the class replaced by the
  null class 10% of the time (classifier-free guidance).
- Sampling: MaskGIT's iterative parallel decoding. Every step samples all masked positions,
  scores each new token by log p + t * Gumbel noise with t = choice_temperature * (1 - (s+1)/S),
  and re-masks the floor(N * cos(pi/2 * (s+1)/S)) lowest-scoring *new* tokens (clamped to
  [1, still-masked - 1]); a token that was kept is never masked again. After exactly S steps
  nothing is masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MaskGIT", "cosine_schedule", "train_mask_ratio", "random_mask", "maskgit_loss",
    "masking_schedule_lengths", "maskgit_sample",
]


def cosine_schedule(r: Tensor | float) -> Tensor | float:
    """Fraction of tokens still masked at progress r in [0, 1]: cos(pi/2 * r)."""
    if isinstance(r, Tensor):
        return torch.cos(r * (math.pi / 2))
    return math.cos(r * math.pi / 2)


def train_mask_ratio(r: Tensor, min_ratio: float = 0.45) -> Tensor:
    """Training masked fraction for uniform r: the cosine schedule bounded below by min_ratio."""
    return cosine_schedule(r).clamp(min=min_ratio, max=1.0)


def random_mask(batch: int, num_tokens: int, min_ratio: float = 0.45, device=None,
                generator: torch.Generator | None = None) -> Tensor:
    """Bool mask (batch, num_tokens): for each row, ceil(ratio * N) positions chosen uniformly."""
    r = torch.rand(batch, device=device, generator=generator)
    n_mask = torch.ceil(train_mask_ratio(r, min_ratio) * num_tokens).clamp(1, num_tokens).long()
    scores = torch.rand(batch, num_tokens, device=device, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each position's score
    return rank < n_mask[:, None]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class MaskGIT(nn.Module):
    """forward(tokens (B, N) long with mask id = codebook_size, labels (B,) with null = num_classes)
    -> logits (B, N, codebook_size)."""

    def __init__(self, codebook_size: int, num_tokens: int, num_classes: int, dim: int = 256, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.1, code_table: Tensor | None = None):
        super().__init__()
        # Everything that fixes the architecture (the export's config.json); the code table's values
        # are a buffer of the state dict, so its width is enough to rebuild the model.
        self.architecture = dict(codebook_size=codebook_size, num_tokens=num_tokens, num_classes=num_classes,
                                 dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout,
                                 code_dim=0 if code_table is None else int(code_table.shape[1]))
        self.codebook_size = codebook_size
        self.num_tokens = num_tokens
        self.num_classes = num_classes
        self.mask_id = codebook_size
        self.null_class = num_classes
        self.tok_emb = nn.Embedding(codebook_size + 1, dim)
        self.cls_emb = nn.Embedding(num_classes + 1, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, num_tokens + 1, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size)
        # Optional code-aware embeddings: FSQ ids are points of a grid, so the model also sees each
        # token's code vector (input: a linear map of it; output: a learned diagonal-Gaussian score
        # around a predicted code, added to the free per-id logits). Still one softmax over all ids.
        self.code_dim = 0 if code_table is None else int(code_table.shape[1])
        if code_table is not None:
            if code_table.shape[0] != codebook_size:
                raise ValueError(f"code_table must have {codebook_size} rows; got {tuple(code_table.shape)}")
            table = torch.cat([code_table.float(), code_table.new_zeros(1, self.code_dim).float()])
            self.register_buffer("code_table", table)  # last row: the mask token
            self.code_in = nn.Linear(self.code_dim, dim, bias=False)
            self.code_out = nn.Linear(dim, 2 * self.code_dim)
        self.apply(self._init)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        emb = self.tok_emb(tokens)
        if self.code_dim:
            emb = emb + self.code_in(self.code_table[tokens])
        x = torch.cat([self.cls_emb(labels)[:, None], emb], dim=1) + self.pos_emb
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x)
        h = self.norm(x[:, 1:])
        logits = self.head(h)
        if self.code_dim:
            mu, s = self.code_out(h).chunk(2, dim=-1)
            prec = F.softplus(s)
            codes = self.code_table[:-1]
            # -sum_i prec_i (mu_i - c_vi)^2 up to a per-position constant (softmax-invariant)
            logits = logits + (2 * prec * mu) @ codes.t() - prec @ codes.pow(2).t()
        return logits

    @classmethod
    def from_pretrained(cls, directory: str, map_location="cpu") -> "MaskGIT":
        """The MaskGIT of an ``fsq-train export`` folder (config.json + model.safetensors), in eval
        mode. A missing, corrupted or mismatched file raises PretrainedError naming it."""
        from .pretrained import load_exported_state, read_pretrained

        arch, state = read_pretrained(directory, "maskgit", map_location)
        code_dim = arch.pop("code_dim", 0)
        table = torch.zeros(arch["codebook_size"], code_dim) if code_dim else None
        return load_exported_state(cls(**arch, code_table=table), state, directory)


def maskgit_loss(model: nn.Module, tokens: Tensor, labels: Tensor, *, num_classes: int, mask_id: int,
                 min_mask_ratio: float = 0.45, label_smoothing: float = 0.1, class_drop: float = 0.1,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked-token cross-entropy. Returns (loss, {"accuracy": masked-token accuracy, "mask": mask})."""
    b, n = tokens.shape
    mask = random_mask(b, n, min_mask_ratio, tokens.device, generator)
    drop = torch.rand(b, device=tokens.device, generator=generator) < class_drop
    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    inp = torch.where(mask, torch.full_like(tokens, mask_id), tokens)
    logits = model(inp, labels)
    sel_logits = logits[mask].float()
    target = tokens[mask]
    loss = F.cross_entropy(sel_logits, target, label_smoothing=label_smoothing)
    with torch.no_grad():
        acc = (sel_logits.argmax(-1) == target).float().mean()
    return loss, {"accuracy": acc, "mask": mask}


def masking_schedule_lengths(num_tokens: int, num_steps: int) -> list[int]:
    """Number of tokens left masked after each decoding step (before the per-step clamping).
    The last entry is 0."""
    return [int(math.floor(num_tokens * cosine_schedule((s + 1) / num_steps))) if s < num_steps - 1 else 0
            for s in range(num_steps)]


def _gumbel(shape, device, generator):
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def maskgit_sample(model: nn.Module, labels: Tensor, *, num_tokens: int, codebook_size: int, num_classes: int,
                   num_steps: int = 12, choice_temperature: float = 4.5, cfg_scale: float = 0.0,
                   temperature: float = 1.0, generator: torch.Generator | None = None,
                   return_history: bool = False):
    """MaskGIT iterative parallel decoding. Returns tokens (B, N) (and, with return_history, the list
    of token tensors after each step, mask id where still masked).

    Guidance: logits = cond + cfg_scale * (cond - uncond) (cfg_scale = 0: no guidance).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    b = labels.shape[0]
    device = labels.device
    mask_id = codebook_size
    tokens = torch.full((b, num_tokens), mask_id, dtype=torch.long, device=device)
    history = []
    null = torch.full_like(labels, num_classes)
    for s in range(num_steps):
        unknown = tokens == mask_id
        if cfg_scale != 0.0:
            logits = model(torch.cat([tokens, tokens]), torch.cat([labels, null])).float()
            cond, uncond = logits.chunk(2)
            logits = cond + cfg_scale * (cond - uncond)
        else:
            logits = model(tokens, labels).float()
        logp = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
        sampled = torch.multinomial(logp.exp().view(-1, codebook_size), 1, generator=generator).view(b, num_tokens)
        sampled = torch.where(unknown, sampled, tokens)
        if s == num_steps - 1:
            tokens = sampled
        else:
            ratio = (s + 1) / num_steps
            n_unknown = unknown.sum(dim=1, keepdim=True)
            mask_len = torch.full_like(n_unknown, int(math.floor(num_tokens * cosine_schedule(ratio))))
            mask_len = torch.maximum(torch.ones_like(mask_len), torch.minimum(n_unknown - 1, mask_len))
            conf = torch.gather(logp, -1, sampled[..., None]).squeeze(-1)
            t = choice_temperature * (1.0 - ratio)
            conf = conf + t * _gumbel(conf.shape, device, generator)
            conf = torch.where(unknown, conf, torch.full_like(conf, float("inf")))  # fixed tokens stay
            # The mask_len lowest-confidence positions are masked again.
            order = conf.argsort(dim=1)
            rank = order.argsort(dim=1)
            remask = rank < mask_len
            tokens = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
        if return_history:
            history.append(tokens.clone())
    return (tokens, history) if return_history else tokens
