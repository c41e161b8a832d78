"""fsq-train tokenize: encode a dataset once, to files stage 2 trains from without the tokenizer.

    OUT/tokens.npy       (N, T) int16 (codebook <= 32767) or int32 token ids of the training split
    OUT/labels.npy       (N,) int64 class labels
    OUT/val_tokens.npy, OUT/val_labels.npy   the same for the held-out split
    OUT/meta.json        levels, codebook size, token grid, image size, class names, data source

The .npy files are memory-mappable (``np.load(..., mmap_mode="r")``). Under torchrun each rank
encodes its contiguous shard into the same memory-mapped file; rank 0 renames the finished files
into place, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .batches import load_data
from .checkpoint import atomic_write
from .distributed import Ctx, barrier
from .loading import load_tokenizer, token_meta, tokenize_dataset, training_seed
from .logs import log

__all__ = ["tokenize_to_folder", "read_codes", "Codes", "CodesError", "token_dtype"]

META_NAME = "meta.json"
FILES = {"train": ("tokens.npy", "labels.npy"), "val": ("val_tokens.npy", "val_labels.npy")}
MASKGIT_META_KEYS = ("codebook_size", "num_tokens", "num_classes", "token_grid", "class_names", "levels")


class CodesError(ValueError):
    """A pretokenized folder is missing a file or holds one that does not match meta.json."""


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _encode_split(tok, ds, tcfg, ctx: Ctx, out: str, names: tuple[str, str], shape_dtype, batch: int, bar) -> None:
    width, dtype = shape_dtype
    n = len(ds)
    tmp = [os.path.join(out, f".{name}.tmp") for name in names]
    if ctx.is_main:
        np.lib.format.open_memmap(tmp[0], mode="w+", dtype=dtype, shape=(n, width)).flush()
        with open(tmp[1], "wb") as f:
            np.save(f, ds.labels.numpy().astype(np.int64))
    barrier(ctx)
    lo, hi = ctx.rank * n // ctx.world, (ctx.rank + 1) * n // ctx.world
    if hi > lo:
        tokens = tokenize_dataset(tok, ds, tcfg.channels_last, ctx.device, batch=batch, indices=range(lo, hi),
                                  progress=bar)
        mm = np.lib.format.open_memmap(tmp[0], mode="r+")
        mm[lo:hi] = tokens.numpy().astype(dtype)
        mm.flush()
        del mm
    barrier(ctx)
    if ctx.is_main:
        for src, name in zip(tmp, names):
            os.replace(src, os.path.join(out, name))


def tokenize_to_folder(tokenizer: str, out: str, ctx: Ctx, data: str | None = None, overrides: dict | None = None,
                       batch: int = 250, seed: int | None = None) -> dict:
    """Encode the training and held-out splits of the tokenizer's data (or `data`) into `out`."""
    from tqdm.auto import tqdm

    tok, tcfg = load_tokenizer(tokenizer, ctx.device)
    cfg = dataclasses.replace(tcfg, **(overrides or {}), **({"data": data} if data else {}))
    seed = training_seed(tokenizer) if seed is None else seed
    train_ds, val_ds = load_data(cfg, seed)
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    barrier(ctx)
    meta = token_meta(tok, cfg, train_ds.num_classes, train_ds.class_names)
    dtype = token_dtype(meta["codebook_size"])
    bar = tqdm(total=len(train_ds) + len(val_ds), desc="tokenize", disable=not ctx.is_main, mininterval=2.0)
    for split, ds in (("train", train_ds), ("val", val_ds)):
        _encode_split(tok, ds, cfg, ctx, out, FILES[split], (meta["num_tokens"], dtype), batch, bar)
    bar.close()
    data_keys = ("data", "image_size", "num_train", "num_val", "shape_size", "shape_jitter", "skip_bad_images")
    meta |= {"image_size": cfg.image_size, "data": cfg.data, "seed": seed, "tokenizer": tokenizer,
             "dtype": dtype.name, "num_train": len(train_ds), "num_val": len(val_ds), "files": FILES,
             "data_config": {k: getattr(cfg, k) for k in data_keys}}
    if ctx.is_main:
        atomic_write(os.path.join(out, META_NAME), lambda f: json.dump(meta, f, indent=1), mode="w")
        log.info("tokenized %d + %d images to %s (%s)", len(train_ds), len(val_ds), out, dtype.name)
    barrier(ctx)
    return meta


@dataclass
class Codes:
    meta: dict
    tokens: np.ndarray       # memory-mapped (N, T)
    labels: np.ndarray
    val_tokens: np.ndarray
    val_labels: np.ndarray

    def meta_for_maskgit(self) -> dict:
        return {k: self.meta[k] for k in MASKGIT_META_KEYS}


def read_codes(folder: str) -> Codes:
    """The files of a tokenize folder, memory-mapped, checked against meta.json (CodesError names the file)."""
    path = os.path.join(folder, META_NAME)
    if not os.path.isfile(path):
        raise CodesError(f"{path} is missing; is {folder} a `fsq-train tokenize` folder?")
    with open(path) as f:
        meta = json.load(f)
    arrays = {}
    for split, (tname, lname) in FILES.items():
        for name in (tname, lname):
            p = os.path.join(folder, name)
            if not os.path.isfile(p):
                raise CodesError(f"{p} is missing (listed in {path})")
            try:
                arrays[name] = np.load(p, mmap_mode="r")
            except ValueError as e:
                raise CodesError(f"{p} cannot be read: {e}") from e
        t, lab = arrays[tname], arrays[lname]
        if t.ndim != 2 or t.shape[1] != meta["num_tokens"] or lab.shape != (t.shape[0],):
            raise CodesError(f"{os.path.join(folder, tname)} has shape {t.shape} with {lab.shape[0]} labels; "
                             f"{path} says {meta['num_tokens']} tokens per image")
    if int(arrays["tokens.npy"].max(initial=0)) >= meta["codebook_size"]:
        raise CodesError(f"{os.path.join(folder, 'tokens.npy')} holds ids >= the codebook size {meta['codebook_size']}")
    return Codes(meta, arrays["tokens.npy"], arrays["labels.npy"], arrays["val_tokens.npy"], arrays["val_labels.npy"])


def as_long(a: np.ndarray) -> torch.Tensor:
    """int64 tensor of (a slice of) a memory-mapped token or label array."""
    return torch.from_numpy(np.array(a, dtype=np.int64))  # a copy: memory maps are read-only
