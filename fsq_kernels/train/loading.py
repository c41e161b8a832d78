"""Building the models of a Config, and loading trained ones from a run folder, a checkpoint or an
``fsq-train export`` folder."""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from ..models.maskgit import MaskGIT
from ..models.pretrained import CONFIG_NAME, WEIGHTS_NAME
from ..models.tokenizer import FSQTokenizer
from .batches import to_model_layout
from .checkpoint import resolve_checkpoint
from .config import Config, config_from_dict

__all__ = ["build_tokenizer", "code_table", "build_maskgit", "is_export", "load_tokenizer", "load_maskgit",
           "token_meta", "tokenize_dataset", "training_seed"]


def build_tokenizer(cfg: Config) -> FSQTokenizer:
    return FSQTokenizer(levels=cfg.levels, channels=cfg.tok_channels, channel_mult=cfg.tok_mult,
                        num_res_blocks=cfg.tok_res_blocks, quantizer=cfg.quantizer, vq_dim=cfg.vq_dim,
                        vq_ema=cfg.vq_ema, vq_beta=cfg.vq_beta, backend=cfg.fsq_backend)


def code_table(levels: list) -> Tensor:
    """(prod(levels), len(levels)) float codes of every FSQ index, from fsq_kernels.FSQ itself."""
    from .. import FSQ

    q = FSQ(list(levels))
    return q.indices_to_codes(torch.arange(q.codebook_size)).reshape(q.codebook_size, len(levels)).float()


def build_maskgit(cfg: Config, meta: dict) -> MaskGIT:
    """MaskGIT for the token metadata `meta` (codebook_size, num_tokens, num_classes, levels)."""
    levels = meta.get("levels")
    table = code_table(levels) if (cfg.mg_code_embed and levels is not None) else None
    return MaskGIT(meta["codebook_size"], meta["num_tokens"], meta["num_classes"], dim=cfg.mg_dim, depth=cfg.mg_depth,
                   heads=cfg.mg_heads, mlp_ratio=cfg.mg_mlp_ratio, dropout=cfg.mg_dropout, code_table=table)


def is_export(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, n)) for n in (CONFIG_NAME, WEIGHTS_NAME))


def _export_config(path: str) -> dict:
    with open(os.path.join(path, CONFIG_NAME)) as f:
        return json.load(f)


def load_tokenizer(path: str, device: torch.device) -> tuple[FSQTokenizer, Config]:
    """(EMA tokenizer in eval mode, its training Config) from a run folder, checkpoint or export."""
    if is_export(path):
        tok = FSQTokenizer.from_pretrained(path, map_location="cpu")
        tcfg = config_from_dict(_export_config(path).get("training_config", {}))
    else:
        ck = resolve_checkpoint(path, "tokenizer")
        tcfg = config_from_dict(ck["config"])
        tok = build_tokenizer(tcfg)
        tok.load_state_dict(ck["ema"])
    tok.to(device).eval().requires_grad_(False)
    if tcfg.channels_last:
        tok.to(memory_format=torch.channels_last)
    return tok, tcfg


def training_seed(path: str) -> int:
    """The seed a run, checkpoint or export was trained with (its data split depends on it)."""
    if is_export(path):
        return int(_export_config(path).get("training_config", {}).get("seed", 0))
    return int(resolve_checkpoint(path, None)["seed"])


def load_maskgit(path: str, device: torch.device) -> tuple[MaskGIT, Config, dict]:
    """(EMA MaskGIT in eval mode, its Config, token metadata) from a run folder, checkpoint or export."""
    if is_export(path):
        mg = MaskGIT.from_pretrained(path, map_location="cpu")
        conf = _export_config(path)
        mcfg, meta = config_from_dict(conf.get("training_config", {})), conf["tokens"]
    else:
        ck = resolve_checkpoint(path, "maskgit")
        mcfg, meta = config_from_dict(ck["config"]), ck["extra"]
        mg = build_maskgit(mcfg, meta)
        mg.load_state_dict(ck["ema"])
    mg.to(device).eval().requires_grad_(False)
    return mg, mcfg, meta


def token_meta(tok: FSQTokenizer, tcfg: Config, num_classes: int, class_names) -> dict:
    """What MaskGIT, sampling and pretokenized files need to know about a tokenizer's tokens."""
    grid = list(tok.encode(to_model_layout(torch.zeros(1, 3, tcfg.image_size, tcfg.image_size,
                                                       device=next(tok.parameters()).device),
                                           tcfg.channels_last))[1].shape[1:])
    return {"codebook_size": tok.codebook_size, "num_tokens": grid[0] * grid[1], "num_classes": num_classes,
            "token_grid": grid, "class_names": list(class_names),
            "levels": list(tcfg.levels) if tcfg.quantizer == "fsq" else None}  # FSQ code table only for FSQ


@torch.no_grad()
def tokenize_dataset(tok: FSQTokenizer, ds, channels_last: bool, device: torch.device, batch: int = 250,
                     indices: range | None = None, progress=None) -> Tensor:
    """(N, tokens) int64 token ids of `ds` (or of `indices` of it), encoded `batch` images at a time."""
    indices = range(len(ds)) if indices is None else indices
    out = []
    for i in range(0, len(indices), batch):
        x, _ = ds.batch(torch.tensor(indices[i:i + batch]))
        _, ind = tok.encode(to_model_layout(x.to(device) * 2 - 1, channels_last))
        out.append(ind.flatten(1).long().cpu())
        if progress is not None:
            progress.update(x.shape[0])
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.long)
