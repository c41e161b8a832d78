"""The training side of fsq-kernels as a package of small parts (see docs/design.md, "Training side").

    config        Config, presets, strict --set parsing, what a resume may change
    distributed   rank / world / device, process group, collectives
    checkpoint    atomic writes, chunked sha256, checkpoint I/O (formats 1 and 2)
    state         EMA, RNG, LR schedule, precision, optimizer step
    batches       the global batch of each step and rank; the run's data
    runner        the generic stage runner every stage runs on (Stage, Parts, run_stage)
    tokenizer_stage, maskgit_stage   the two stages (a step and an eval each)
    metrics       usage, perplexity, PSNR, Frechet distance (train and study)
    loading       building models, loading runs / checkpoints / exports
    evaluation, figures   sampling, the judge, every metric of the demo, figures
    export, pretokenize   fsq-train export / tokenize
    study         the FSQ vs VQ codebook study
    cli           fsq-train (python -m fsq_kernels.train)
    debug         test hooks behind FSQ_TRAIN_DEBUG
"""

from .batches import batch_indices, load_data, to_model_layout
from .checkpoint import (
    CKPT_FORMAT, CheckpointError, atomic_torch_save, atomic_write, latest_checkpoint, list_checkpoints,
    load_checkpoint, save_checkpoint,
)
from .cli import main
from .config import PRESETS, Config, ConfigError, config_from_dict, make_config
from .distributed import Ctx, setup_distributed
from .loading import build_maskgit, build_tokenizer, load_maskgit, load_tokenizer, tokenize_dataset
from .maskgit_stage import MaskGITStage, evaluate_maskgit, train_maskgit
from .runner import Parts, Stage, run_stage
from .state import EMA, lr_factor, rng_state, seed_all, set_rng_state
from .tokenizer_stage import TokenizerStage, evaluate_tokenizer, train_tokenizer

__all__ = [
    "CKPT_FORMAT", "CheckpointError", "Config", "ConfigError", "Ctx", "EMA", "MaskGITStage", "PRESETS", "Parts",
    "Stage", "TokenizerStage", "atomic_torch_save", "atomic_write", "batch_indices", "build_maskgit",
    "build_tokenizer", "config_from_dict", "evaluate_maskgit", "evaluate_tokenizer", "latest_checkpoint",
    "list_checkpoints", "load_checkpoint", "load_data", "load_maskgit", "load_tokenizer", "lr_factor", "main",
    "make_config", "rng_state", "run_stage", "save_checkpoint", "seed_all", "set_rng_state", "setup_distributed",
    "to_model_layout", "tokenize_dataset", "train_maskgit", "train_tokenizer",
]
