"""fsq-train: train an FSQ image tokenizer and a class-conditional MaskGIT on its tokens, sample,
evaluate, export and pretokenize.

    fsq-train tokenizer --out runs/tok [--preset demo] [--steps N] [--resume]
    fsq-train maskgit   --out runs/mg (--tokenizer runs/tok | --codes runs/codes) [--resume]
    fsq-train sample    --out runs/samples --tokenizer runs/tok --maskgit runs/mg
    fsq-train eval      --out runs/eval --tokenizer runs/tok --maskgit runs/mg
    fsq-train demo      --out runs/demo        # both stages end to end on the built-in data
    fsq-train export    --from runs/tok --out exports/tok    # model.safetensors + config.json
    fsq-train tokenize  --tokenizer runs/tok --out runs/codes  # tokens.npy, labels.npy, meta.json
    fsq-train study     --out runs/study [--quick]   # FSQ vs VQ codebook study
    fsq-train uvim      --task depth --out runs/uvim  # UViM: both stages, metrics.json, grid.png
    fsq-train uvim-study --out runs/uvim-study [--quick]   # UViM: every task x quantizer

Training runs unchanged under ``torchrun --nproc_per_node N`` (DDP; nccl on GPUs, gloo on CPU).
``--resume`` takes the config and seed from the latest checkpoint; see fsq_kernels/train/config.py
for what a resume may change. Exit status: 0 success, 2 usage error (bad flag, bad --set value,
a resume flag that conflicts with the checkpoint), 1 runtime error (damaged checkpoint or export,
unreadable images, an existing run without --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from .. import __version__
from ..data import UnreadableImagesError
from ..models.pretrained import PretrainedError
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .config import PRESETS, ConfigError, config_from_dict, make_config, parse_overrides, reconcile_resume
from .distributed import cleanup_distributed, setup_distributed
from .logs import configure_logging, log
from .pretokenize import CodesError
from .runner import RunExistsError

__all__ = ["main", "build_parser", "resolve_config"]

SAMPLING_KEYS = ("decode_steps", "choice_temperature", "cfg_scale", "sample_temperature", "samples_per_class",
                 "clf_steps", "clf_batch", "clf_lr", "clf_blur", "precision")
DATA_SET_KEYS = ("image_size", "num_train", "num_val", "shape_size", "shape_jitter", "skip_bad_images")
RUNTIME_ERRORS = (CheckpointError, RunExistsError, UnreadableImagesError, PretrainedError, CodesError,
                  FileNotFoundError)


def _training_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl, config.json)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0; on --resume, the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="training steps of the stage (demo: of both stages)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, with its config and seed")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="starting configuration")
    p.add_argument("--data", default=None, help="dataset: shapes | mnist | folder:PATH")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set cfg_scale=2.0; see config.py")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    _device_flag(p)
    return p


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: CUDA when available); cpu keeps DDP on gloo")


def _use_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=f"output folder ({what})")
    p.add_argument("--tokenizer", required=True, help="tokenizer run folder, checkpoint or export")
    p.add_argument("--maskgit", required=True, help="MaskGIT run folder, checkpoint or export")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: trained)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a sampling / judge setting: {', '.join(SAMPLING_KEYS)}")
    _device_flag(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsq-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fsq-train {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _training_flags()
    sub.add_parser("tokenizer", parents=[train], help="train the FSQ tokenizer")
    m = sub.add_parser("maskgit", parents=[train], help="train MaskGIT on a tokenizer's tokens")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--tokenizer", help="tokenizer run folder, checkpoint or export (on --resume: the checkpoint's)")
    src.add_argument("--codes", help="pretokenized folder from `fsq-train tokenize` (no tokenizer in memory)")
    sub.add_parser("demo", parents=[train], help="both stages end to end on the built-in data (preset demo)")
    s = sub.add_parser("sample", help="class-conditional samples from trained models")
    _use_flags(s, "samples.pt, samples.png")
    s.add_argument("--per-class", type=int, default=None, help="samples per class (default: the trained setting)")
    _use_flags(sub.add_parser("eval", help="every metric of the demo for trained models"),
               "metrics.json and figures")
    e = sub.add_parser("export", help="write a run's EMA weights as model.safetensors + config.json")
    e.add_argument("--from", dest="source", required=True, help="tokenizer or MaskGIT run folder or checkpoint")
    e.add_argument("--out", required=True, help="export folder (created; existing files are replaced)")
    t = sub.add_parser("tokenize", help="encode a dataset to tokens.npy / labels.npy / meta.json")
    t.add_argument("--tokenizer", required=True, help="tokenizer run folder, checkpoint or export")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--data", default=None, help="dataset (default: the tokenizer's): shapes | mnist | folder:PATH")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a data setting: {', '.join(DATA_SET_KEYS)}")
    t.add_argument("--batch", type=int, default=250, help="images encoded at a time per rank")
    t.add_argument("--seed", type=int, default=None, help="data seed (default: the tokenizer's)")
    _device_flag(t)
    sub.add_parser("study", add_help=False, help="FSQ vs VQ codebook usage / PSNR vs codebook size (study -h)")
    sub.add_parser("uvim", add_help=False, help="UViM with an FSQ guiding code on a procedural dense task (uvim -h)")
    sub.add_parser("uvim-study", add_help=False, help="UViM: every task with every quantizer (uvim-study -h)")
    return p


def _given(args, stages: tuple[str, ...]) -> dict:
    """The config keys this command line sets explicitly (not those a preset fills in)."""
    given = parse_overrides(args.set)
    if args.data:
        given["data"] = args.data
    if args.steps is not None:
        given |= {key: args.steps for key in stages}
    return given


def resolve_config(args, out: str, step_keys: tuple[str, ...]):
    """(Config, seed, preset) of a training command; on --resume with a checkpoint in `out`, the
    checkpoint's, with the keys given again reconciled (ConfigError on a conflict)."""
    given = _given(args, step_keys)
    preset = args.preset or ("demo" if args.command == "demo" else None)
    latest = latest_checkpoint(out) if args.resume else None
    if latest is None:
        return dataclasses.replace(make_config(preset), **given), (args.seed or 0), preset
    ck = load_checkpoint(latest)
    cfg, conflicts = reconcile_resume(config_from_dict(ck["config"]), given)
    if args.seed is not None and args.seed != ck["seed"]:
        conflicts.append(f"seed: checkpoint has {ck['seed']}, given {args.seed}")
    if args.preset and ck.get("preset") not in (None, args.preset):
        conflicts.append(f"preset: checkpoint has {ck['preset']!r}, given {args.preset!r}")
    if conflicts:
        raise ConfigError(f"--resume of {latest}: flags conflict with the checkpoint:\n  " + "\n  ".join(conflicts)
                          + "\nDrop them (the checkpoint's values are used) or start a new --out.")
    return cfg, int(ck["seed"]), ck.get("preset") or preset


def _write_metrics(metrics: dict, out: str, t0: float) -> None:
    from .checkpoint import atomic_write

    metrics["seconds"] = time.time() - t0
    atomic_write(os.path.join(out, "metrics.json"), lambda f: json.dump(metrics, f, indent=2), mode="w")
    print(json.dumps(metrics, indent=2), flush=True)  # the summary: stdout


def _run(args, ctx, t0: float) -> None:
    from . import evaluation
    from .maskgit_stage import train_maskgit
    from .tokenizer_stage import train_tokenizer

    cmd = args.command
    if cmd == "tokenizer":
        train_tokenizer(args.cfg, args.out, args.seed_, args.resume, ctx, args.preset_)
    elif cmd == "maskgit":
        train_maskgit(args.cfg, args.out, args.seed_, args.resume, ctx, args.source_tokenizer, args.source_codes,
                      args.preset_)
    elif cmd == "demo":
        tok_dir, mg_dir = os.path.join(args.out, "tokenizer"), os.path.join(args.out, "maskgit")
        train_tokenizer(args.cfg, tok_dir, args.seed_, args.resume, ctx, args.preset_)
        t1 = time.time()
        train_maskgit(args.cfg_mg, mg_dir, args.seed_, args.resume, ctx, tok_dir, None, args.preset_)
        t2 = time.time()
        if ctx.is_main:
            metrics = evaluation.run_eval(args.out, tok_dir, mg_dir, args.seed_, ctx)
            metrics["stage_seconds"] = {"tokenizer": t1 - t0, "maskgit": t2 - t1, "eval": time.time() - t2}
            _write_metrics(metrics, args.out, t0)
            log.info("demo finished in %.1f s (%.1f min); metrics in %s", metrics["seconds"], metrics["seconds"] / 60,
                     os.path.join(args.out, "metrics.json"))
    elif cmd in ("sample", "eval") and ctx.is_main:
        sampling = parse_overrides(args.set)
        bad = sorted(set(sampling) - set(SAMPLING_KEYS))
        if bad:
            raise ConfigError(f"{cmd} --set takes only {list(SAMPLING_KEYS)}; got {bad}")
        if cmd == "sample":
            evaluation.run_sample(args.out, args.tokenizer, args.maskgit, args.seed, ctx, args.cfg_scale,
                                  args.per_class, sampling)
        else:
            _write_metrics(evaluation.run_eval(args.out, args.tokenizer, args.maskgit, args.seed, ctx, args.cfg_scale,
                                               sampling), args.out, t0)
    elif cmd == "export" and ctx.is_main:
        from .export import export

        export(args.source, args.out)
    elif cmd == "tokenize":
        from .pretokenize import tokenize_to_folder

        data = parse_overrides(args.set)
        bad = sorted(set(data) - set(DATA_SET_KEYS))
        if bad:
            raise ConfigError(f"tokenize --set takes only {list(DATA_SET_KEYS)}; got {bad}")
        tokenize_to_folder(args.tokenizer, args.out, ctx, data=args.data, overrides=data, batch=args.batch,
                           seed=args.seed)


def _prepare_training(args) -> None:
    """Resolve the config(s) of a training command onto args (cfg, seed_, preset_, sources)."""
    if args.command == "demo":
        args.cfg, args.seed_, args.preset_ = resolve_config(args, os.path.join(args.out, "tokenizer"),
                                                            ("tok_steps", "mg_steps"))
        args.cfg_mg = resolve_config(args, os.path.join(args.out, "maskgit"), ("tok_steps", "mg_steps"))[0]
        return
    key = "tok_steps" if args.command == "tokenizer" else "mg_steps"
    args.cfg, args.seed_, args.preset_ = resolve_config(args, args.out, (key,))
    if args.command == "maskgit":
        args.source_tokenizer, args.source_codes = args.tokenizer, args.codes
        latest = latest_checkpoint(args.out) if args.resume else None
        if args.tokenizer is None and args.codes is None:
            source = load_checkpoint(latest).get("source", {}) if latest else {}
            args.source_tokenizer, args.source_codes = source.get("tokenizer"), source.get("codes")
            if not (args.source_tokenizer or args.source_codes):
                raise ConfigError("maskgit needs --tokenizer or --codes (or --resume of a run that records one)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:  # the codebook study has its own options (fsq_kernels/train/study.py)
        from .study import main as study_main

        return study_main(argv[1:])
    if argv[:1] in (["uvim"], ["uvim-study"]):  # UViM has its own options (train/uvim.py, train/uvim_study.py)
        from .uvim import main as uvim_main
        from .uvim_study import main as uvim_study_main

        return (uvim_main if argv[0] == "uvim" else uvim_study_main)(argv[1:])
    args = build_parser().parse_args(argv)  # usage errors: exit status 2
    configure_logging(int(os.environ.get("RANK", "0")))
    t0 = time.time()
    try:
        if args.command in ("tokenizer", "maskgit", "demo"):
            _prepare_training(args)
            if args.print_config:
                print(json.dumps(dataclasses.asdict(args.cfg) | {"seed": args.seed_, "preset": args.preset_},
                                 indent=1))
                return 0
            if args.cfg.threads > 0:
                torch.set_num_threads(args.cfg.threads)
        torch.set_flush_denormal(True)
        device = getattr(args, "device", "cpu")  # export reads and writes on the CPU
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu or auto)")
        ctx = setup_distributed(None if device == "auto" else device)
        try:
            _run(args, ctx, t0)
        finally:
            cleanup_distributed()
    except ConfigError as e:
        print(f"fsq-train {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RUNTIME_ERRORS as e:
        print(f"fsq-train {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
