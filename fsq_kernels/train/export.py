"""fsq-train export: a run's EMA weights as ``model.safetensors``, its ``config.json`` (model type,
every architecture field, levels, variant, quantizer, the training config) and ``SHA256SUMS``;
the layout Hugging Face tools read. Load back with ``FSQTokenizer.from_pretrained(DIR)`` or
``MaskGIT.from_pretrained(DIR)``; no training checkpoint needed. Format-1 checkpoints export too."""

from __future__ import annotations

import json
import os

from .. import __version__
from ..models.pretrained import CONFIG_NAME, SUMS_NAME, WEIGHTS_NAME, sha256_file
from .checkpoint import atomic_write, resolve_checkpoint
from .config import config_from_dict
from .loading import build_maskgit, build_tokenizer
from .logs import log

__all__ = ["export", "MODEL_TYPES"]

MODEL_TYPES = {"tokenizer": "fsq_tokenizer", "maskgit": "maskgit"}


def export(source: str, out: str) -> str:
    """Export the latest checkpoint of run folder `source` (or checkpoint file `source`) to `out`."""
    ck = resolve_checkpoint(source, None)
    stage = ck["stage"]
    if stage not in MODEL_TYPES:
        raise ValueError(f"{source}: cannot export a {stage!r} checkpoint; expected one of {sorted(MODEL_TYPES)}")
    cfg = config_from_dict(ck["config"])
    model = build_tokenizer(cfg) if stage == "tokenizer" else build_maskgit(cfg, ck["extra"])
    model.load_state_dict(ck["ema"])  # the EMA weights: what evaluation and sampling use
    config = {"model_type": MODEL_TYPES[stage], "architecture": model.architecture,
              "training_config": ck["config"] | {"seed": ck["seed"]},
              "source": {"checkpoint_step": int(ck["step"]), "checkpoint_format": int(ck["format"])},
              "fsq_kernels_version": __version__}
    if stage == "tokenizer":
        config |= {"levels": list(cfg.levels), "variant": model.architecture.get("variant"),
                   "quantizer": cfg.quantizer, "codebook_size": model.codebook_size}
    else:
        config |= {"tokens": ck["extra"], "levels": ck["extra"].get("levels"),
                   "codebook_size": ck["extra"]["codebook_size"]}
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, WEIGHTS_NAME), lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(os.path.join(out, CONFIG_NAME), lambda f: json.dump(config, f, indent=1), mode="w")
    sums = "".join(f"{sha256_file(os.path.join(out, n))}  {n}\n" for n in (WEIGHTS_NAME, CONFIG_NAME))
    atomic_write(os.path.join(out, SUMS_NAME), lambda f: f.write(sums), mode="w")
    log.info("exported the %s (EMA weights of step %d) to %s", stage, ck["step"], out)
    return out
