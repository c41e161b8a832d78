"""FSQ vs VQ codebook study: the FSQ paper's Fig. 3 (codebook usage and reconstruction vs
codebook size) at small scale, on the built-in procedural shapes data.

    fsq-train study --out runs/study [--quick]          (or: python -m fsq_kernels.study ...)

The same tokenizer (the ``demo`` preset: 32x32 images, 4x downsampling, 8x8 = 64 tokens per
image) is trained once with FSQ and once with the VQ baseline (models/vq.py) per codebook size,
with equal budgets: same steps, batch, data order, architecture, optimizer, LR schedule, EMA and
seed. Training is the tokenizer stage itself (tokenizer_stage.py on the runner); only the quantizer differs. VQ gets as
many codes as the FSQ level set it is compared with (prod(levels)) and the same code dimension
(len(levels), FSQ's bottleneck width), beta = 0.25, the VQ-VAE codebook init U(-1/K, 1/K), and a
codebook loss (no EMA, no reseeding, no k-means init, unless ``--vq-ema``).

Evaluation uses the final EMA weights on the held-out ``test`` split (never seen in training):
codebook usage (fraction of the codebook used at least once) and perplexity (exp of the entropy of
the code histogram) over at least ``usage_tokens`` tokens (default 500,000: 7,813 images x 64),
PSNR (images in [0, 1], mean over images) on the first ``psnr_images`` of them (default 1,000).

Writes OUT/study.csv (quantizer, nominal_size, codebook_size, codebook_usage, perplexity, psnr),
OUT/study.md (table, settings, timings), OUT/study.png (usage, perplexity and PSNR vs codebook size)
and, per model, OUT/models/<quantizer>_2^<k>/ (the stage's run folder: checkpoint, metrics.jsonl)
with result.json. A rerun with the same OUT skips models whose result.json exists.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time

import torch

from ..data import ShapesDataset
from .batches import to_model_layout
from .checkpoint import atomic_write, latest_checkpoint
from .config import config_from_dict, make_config
from .distributed import Ctx
from .figures import save_figure
from .loading import load_tokenizer
from .logs import read_jsonl
from .metrics import code_counts, usage_and_perplexity
from .tokenizer_stage import evaluate_tokenizer, train_tokenizer

# The paper's level sets for nominal codebook sizes 2^6 ... 2^14 (Table 1 / Fig. 3).
PAPER_LEVELS: dict[int, list[int]] = {
    6: [8, 8],
    8: [8, 6, 5],
    10: [8, 5, 5, 5],
    12: [7, 5, 5, 5, 5],
    14: [8, 8, 8, 6, 5],
}
CSV_COLUMNS = ["quantizer", "nominal_size", "codebook_size", "codebook_usage", "perplexity", "psnr"]


@dataclasses.dataclass
class StudySettings:
    sizes: list                      # exponents k of the nominal sizes 2^k (keys of PAPER_LEVELS)
    steps: int                       # training steps per model (both quantizers)
    usage_tokens: int = 500_000      # held-out tokens for codebook usage / perplexity
    psnr_images: int = 1000          # held-out images for PSNR
    jobs: int = 2                    # models trained at once (processes, one torch thread each)
    vq_ema: bool = False             # VQ codebook by EMA updates instead of the codebook loss
    overrides: dict = dataclasses.field(default_factory=dict)  # Config fields on top of `demo`


DEFAULT = StudySettings(sizes=[6, 8, 10, 12, 14], steps=1000)
QUICK = StudySettings(sizes=[6, 10, 14], steps=150, usage_tokens=500_000, psnr_images=500)


def study_config(settings: StudySettings, quantizer: str, levels: list):
    """Config of one model: the `demo` preset's tokenizer, the study's budget, one quantizer."""
    cfg = make_config("demo")
    cfg.levels = list(levels)
    cfg.quantizer = quantizer
    cfg.vq_ema = settings.vq_ema and quantizer == "vq"
    cfg.tok_steps = settings.steps
    cfg.warmup_steps = min(cfg.warmup_steps, max(1, settings.steps // 10))
    cfg.num_val = 500                          # the stage's own end-of-run check; the study evaluates on `test`
    cfg.eval_every = settings.steps            # that check only once, at the end
    cfg.ckpt_every = settings.steps            # one checkpoint: the final one
    cfg.keep_ckpts = 1
    cfg.log_every = max(1, min(25, settings.steps // 4))
    for k, v in settings.overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown Config field {k!r} in study overrides")
        setattr(cfg, k, v)
    return cfg


_TEST_CACHE: dict = {}


def _test_images(n: int, seed: int, image_size: int):
    """The held-out images: the procedural data's `test` split (disjoint from train and val)."""
    key = (n, seed, image_size)
    if key not in _TEST_CACHE:
        _TEST_CACHE.clear()
        _TEST_CACHE[key] = ShapesDataset(n, seed, "test", image_size)
    return _TEST_CACHE[key]


@torch.no_grad()
def evaluate_codebook(tok, cfg, seed: int, usage_tokens: int, psnr_images: int, device) -> dict:
    """Usage / perplexity over >= usage_tokens held-out tokens, PSNR over psnr_images held-out images."""
    grid = tok.encode(to_model_layout(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device),
                                      cfg.channels_last))[1]
    per_image = grid[0].numel()
    n = max(math.ceil(usage_tokens / per_image), psnr_images)
    ds = _test_images(n, seed, cfg.image_size)
    counts = torch.zeros(tok.codebook_size, dtype=torch.float64)
    for i in range(0, n, 500):
        x, _ = ds.batch(torch.arange(i, min(i + 500, n)))
        _, ind = tok.encode(to_model_layout(x.to(device) * 2 - 1, cfg.channels_last))
        counts += code_counts(ind, tok.codebook_size)
    usage, perplexity = usage_and_perplexity(counts)
    rec = evaluate_tokenizer(tok, ds, cfg, device, limit=psnr_images)
    return {"codebook_usage": usage, "perplexity": perplexity, "psnr": rec["psnr"], "usage_tokens": int(counts.sum()), "usage_images": n, "psnr_images": rec["num_images"]}


def _model_dir(out: str, quantizer: str, k: int) -> str:
    return os.path.join(out, "models", f"{quantizer}_2^{k}")


def train_and_evaluate(job: dict) -> dict:
    """One model of the study: train with the tokenizer stage, evaluate its EMA weights."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    torch.set_flush_denormal(True)
    cfg = config_from_dict(job["config"])
    mdir = job["dir"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Ctx(0, 1, 0, device)
    t0 = time.time()
    train_tokenizer(cfg, mdir, job["seed"], latest_checkpoint(mdir) is not None, ctx)
    t1 = time.time()
    tok, tcfg = load_tokenizer(mdir, device)
    res = evaluate_codebook(tok, tcfg, job["seed"], job["usage_tokens"], job["psnr_images"], device)
    last = [r for r in read_jsonl(os.path.join(mdir, "metrics.jsonl")) if "loss" in r][-1]
    res = {"quantizer": cfg.quantizer, "nominal_size": 2 ** job["k"], "codebook_size": tok.codebook_size,
           "levels": list(cfg.levels), "code_dim": int(tok.encoder.conv_out.out_channels), **res,
           "steps": cfg.tok_steps, "batch": cfg.tok_batch, "final_train_loss": last["loss"],
           "final_train_psnr": last["train_psnr"], "vq_ema": cfg.vq_ema,
           "train_seconds": t1 - t0, "eval_seconds": time.time() - t1}
    atomic_write(os.path.join(mdir, "result.json"), lambda f: json.dump(res, f, indent=1), mode="w")
    return res


def _worker_init(slots) -> None:
    # Each worker's stage progress bar gets its own line under the study's bar.
    os.environ["TQDM_POSITION"] = str(slots.get())
    torch.set_num_threads(1)


def run_study(out: str, quick: bool = False, seed: int = 0, steps: int | None = None, jobs: int | None = None,
              sizes: list | None = None, settings: StudySettings | None = None) -> list[dict]:
    """Train and evaluate every (quantizer, size); write study.csv, study.md, study.png; return the rows."""
    from tqdm.auto import tqdm

    s = dataclasses.replace(settings or (QUICK if quick else DEFAULT))
    if steps is not None:
        s.steps = steps
    if sizes is not None:
        s.sizes = list(sizes)
    if jobs is not None:
        s.jobs = jobs
    if torch.cuda.is_available():
        s.jobs = 1
    bad = [k for k in s.sizes if k not in PAPER_LEVELS]
    if bad:
        raise ValueError(f"sizes must be among {sorted(PAPER_LEVELS)} (exponents of 2); got {bad}")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    jobs_list, results = [], {}
    for k in s.sizes:
        for q in ("fsq", "vq"):
            cfg = study_config(s, q, PAPER_LEVELS[k])
            mdir = _model_dir(out, q, k)
            done = os.path.join(mdir, "result.json")
            if os.path.exists(done):
                with open(done) as f:
                    r = json.load(f)
                if r.get("steps") == s.steps and r.get("vq_ema") == cfg.vq_ema:
                    results[(q, k)] = r
                    continue
                raise ValueError(f"{mdir} holds a model of another study setting ({r.get('steps')} steps); "
                                 "choose another --out")
            jobs_list.append({"k": k, "quantizer": q, "config": dataclasses.asdict(cfg), "dir": mdir, "seed": seed,
                              "usage_tokens": s.usage_tokens, "psnr_images": s.psnr_images,
                              "threads": 1 if s.jobs > 1 else 0})
    # Largest first: the slowest models start early, so the workers finish together.
    jobs_list.sort(key=lambda j: (-j["k"], j["quantizer"] != "vq"))
    bar = tqdm(total=len(s.sizes) * 2, initial=len(results), desc="study (models)", position=0, dynamic_ncols=True)
    if s.jobs <= 1 or len(jobs_list) <= 1:
        for j in jobs_list:
            bar.set_postfix(model=f"{j['quantizer']} 2^{j['k']}")
            results[(j["quantizer"], j["k"])] = train_and_evaluate(j)
            bar.update(1)
    else:
        import concurrent.futures as cf

        import torch.multiprocessing as tmp

        mp = tmp.get_context("spawn")
        slots = mp.Queue()
        for i in range(s.jobs):
            slots.put(i + 1)
        with cf.ProcessPoolExecutor(max_workers=s.jobs, mp_context=mp, initializer=_worker_init,
                                    initargs=(slots,)) as ex:
            futs = {ex.submit(train_and_evaluate, j): j for j in jobs_list}
            for fut in cf.as_completed(futs):
                j = futs[fut]
                results[(j["quantizer"], j["k"])] = fut.result()
                bar.update(1)
    bar.close()
    rows = [results[(q, k)] for k in sorted(s.sizes) for q in ("fsq", "vq")]
    wall = time.time() - t_start
    write_csv(rows, os.path.join(out, "study.csv"))
    plot_study(rows, os.path.join(out, "study.png"))
    write_markdown(rows, s, seed, wall, quick, os.path.join(out, "study.md"))
    print(f"[fsq-train study] {len(rows)} models in {wall:.0f} s ({wall / 60:.1f} min); "
          f"{os.path.join(out, 'study.md')}", flush=True)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    def write(f):
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r["quantizer"], r["nominal_size"], r["codebook_size"], f"{r['codebook_usage']:.6f}",
                        f"{r['perplexity']:.3f}", f"{r['psnr']:.4f}"])

    atomic_write(path, write, mode="w")


def plot_study(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"fsq": dict(color="tab:blue", marker="o", label="FSQ"),
              "vq": dict(color="tab:red", marker="s", label="VQ")}
    for q in ("fsq", "vq"):
        rr = sorted((r for r in rows if r["quantizer"] == q), key=lambda r: r["codebook_size"])
        if not rr:
            continue
        x = [r["codebook_size"] for r in rr]
        ax[0].plot(x, [100 * r["codebook_usage"] for r in rr], **styles[q])
        ax[1].plot(x, [r["perplexity"] for r in rr], **styles[q])
        ax[2].plot(x, [r["psnr"] for r in rr], **styles[q])
    xs = sorted({r["codebook_size"] for r in rows})
    ax[1].plot(xs, xs, ":", color="gray", label="perplexity = codebook size")
    ax[0].set(xscale="log", xlabel="codebook size", ylabel="codebook usage (%)", ylim=(0, 105),
              title="codebook usage (held-out tokens)")
    ax[1].set(xscale="log", yscale="log", xlabel="codebook size", ylabel="perplexity",
              title="code perplexity exp(H)")
    ax[2].set(xscale="log", xlabel="codebook size", ylabel="PSNR (dB)", title="reconstruction PSNR (held-out)")
    for a in ax:
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write_markdown(rows: list[dict], s: StudySettings, seed: int, wall: float, quick: bool, path: str) -> None:
    cfg = study_config(s, "fsq", PAPER_LEVELS[s.sizes[0]])
    r0 = rows[0]
    lines = [
        f"# FSQ vs VQ codebook study{' (quick smoke run)' if quick else ''}",
        "",
        "The FSQ paper's Fig. 3 (Mentzer et al. 2023, arXiv 2309.15505) at small scale: the same tokenizer trained "
        "with FSQ and with VQ at each codebook size, equal budgets.",
        "",
        "| nominal | FSQ levels | codebook | FSQ usage | VQ usage | FSQ perplexity | VQ perplexity | FSQ PSNR (dB) "
        "| VQ PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["quantizer"], r["nominal_size"]): r for r in rows}
    for k in sorted(s.sizes):
        f, v = by.get(("fsq", 2 ** k)), by.get(("vq", 2 ** k))
        if f is None or v is None:
            continue
        lines.append(f"| 2^{k} | {f['levels']} | {f['codebook_size']} | {100 * f['codebook_usage']:.1f}% | "
                     f"{100 * v['codebook_usage']:.1f}% | {f['perplexity']:.1f} | {v['perplexity']:.1f} | "
                     f"{f['psnr']:.2f} | {v['psnr']:.2f} |")
    vq_kind = "EMA codebook updates (decay 0.99)" if s.vq_ema else "codebook loss (no EMA)"
    lines += [
        "",
        "## Setting",
        "",
        f"- Data: built-in procedural shapes, {cfg.image_size}x{cfg.image_size} RGB, {cfg.num_train} training images "
        f"(`train` split), seed {seed}.",
        f"- Tokenizer: the `demo` preset (channels {cfg.tok_channels}, mult {cfg.tok_mult}, "
        f"{cfg.tok_res_blocks} res block per level, {r0['usage_tokens'] // r0['usage_images']} tokens per image), "
        f"{cfg.rec_loss.upper()} loss, no perceptual/GAN loss.",
        f"- Budget, identical for every model: {s.steps} steps, batch {cfg.tok_batch}, same data order and seed, "
        f"AdamW lr {cfg.tok_lr} betas {cfg.tok_betas}, {cfg.warmup_steps} warmup steps then cosine to "
        f"{cfg.min_lr_ratio}x, grad clip {cfg.grad_clip}, weight EMA {cfg.ema_decay} (evaluated).",
        f"- FSQ: the paper's level sets, `paper` bound. VQ: prod(levels) codes (the same number as the FSQ level "
        f"set), code dimension = len(levels) (FSQ's bottleneck width, so encoder/decoder are identical), "
        f"beta = 0.25, codebook init U(-1/K, 1/K), {vq_kind}, no reseeding, no k-means init, straight-through "
        "gradients.",
        f"- Metrics on the held-out `test` split, final EMA weights: codebook usage = fraction of the codebook used "
        f"at least once and perplexity = exp(entropy of the code histogram), both over {r0['usage_tokens']:,} tokens "
        f"({r0['usage_images']:,} images); PSNR (images in [0, 1], mean over images) over the first "
        f"{r0['psnr_images']} of those images.",
        "",
        "## Per model",
        "",
        "| quantizer | codebook | code dim | usage | perplexity | PSNR (dB) | final train loss (VQ: incl. its aux loss) "
        "| train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['quantizer']} | {r['codebook_size']} | {r['code_dim']} | {r['codebook_usage']:.4f} | "
                     f"{r['perplexity']:.1f} | {r['psnr']:.2f} | {r['final_train_loss']:.4f} | "
                     f"{r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    lines += ["", f"Wall time of this run: {wall:.0f} s ({wall / 60:.1f} min), {s.jobs} model(s) at a time "
              f"on {os.cpu_count()} CPU cores (models already finished in an earlier run of the same OUT are "
              "reused, not counted).", ""]
    atomic_write(path, lambda f: f.write("\n".join(lines)), mode="w")


def _parser(prog: str = "fsq-train study") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (study.csv, study.md, study.png, models/)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: sizes 2^{QUICK.sizes}, {QUICK.steps} steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model (default {DEFAULT.steps})")
    p.add_argument("--jobs", type=int, default=None,
                   help="models trained at once, one torch thread each (default 2; 1 on a GPU)")
    p.add_argument("--sizes", default=None, help="comma-separated exponents, e.g. 6,10,14 (default 6,8,10,12,14)")
    p.add_argument("--vq-ema", action="store_true", help="VQ codebook by EMA updates instead of its loss")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    s = dataclasses.replace(QUICK if args.quick else DEFAULT, vq_ema=args.vq_ema)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    run_study(args.out, quick=args.quick, seed=args.seed, steps=args.steps, jobs=args.jobs, sizes=sizes, settings=s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
