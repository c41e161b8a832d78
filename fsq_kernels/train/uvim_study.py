"""The UViM study: every task with every quantizer, FSQ against VQ, on procedural data.

    fsq-train uvim-study --out DIR [--quick | --tiny] [--quantizers fsq,vq-uvim,vq] [--levels 8,5,5,5]
                         [--tasks depth,colorization,panoptic] [--seeds 0,1]

Each model is ``fsq-train uvim`` (train.uvim.train_uvim) in OUT/models/<task>_<quantizer>_<levels>_s<seed>/.
The default covers FSQ and UViM's VQ (``vq-uvim``: EMA dictionary, L2-normalised codewords, no
commitment loss, splitting) on the three tasks at the task's level set (TASK_LEVELS); ``--quantizers``
adds the plain VQ baseline (``vq``), ``--levels`` another level set for every task (VQs get as many
codes), ``--seeds`` more seeds. A rerun with the same OUT reuses every model whose metrics.json
exists (and resumes unfinished ones).

Writes OUT/uvim.csv (task, quantizer, codebook_size, code_source, metric, value, codebook_usage,
perplexity, then stderr, levels, seed), OUT/uvim.md (tables with standard errors and the issue's
claims checked) and OUT/uvim.png (the ranking metric per code source, per task and quantizer).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

from .checkpoint import atomic_write, latest_checkpoint
from .distributed import Ctx
from .figures import save_figure
from .uvim import TASK_LEVELS, make_uvim_config, train_uvim
from .uvim_eval import SOURCES

__all__ = ["CSV_COLUMNS", "QUANTIZER_LABELS", "run_uvim_study", "main"]

CSV_COLUMNS = ["task", "quantizer", "codebook_size", "code_source", "metric", "value", "codebook_usage",
               "perplexity", "stderr", "levels", "seed"]
QUANTIZER_LABELS = {
    "fsq": "FSQ",
    "vq-uvim": "VQ as UViM (EMA dictionary, L2-normalised codewords, no commitment loss, splitting)",
    "vq": "plain VQ (codebook + commitment losses, beta 0.25)",
}


def _model_dir(out: str, task: str, quantizer: str, levels: list, seed: int) -> str:
    return os.path.join(out, "models", f"{task}_{quantizer}_{'-'.join(map(str, levels))}_s{seed}")


def run_uvim_study(out: str, preset: str = "default", tasks=None, quantizers=("fsq", "vq-uvim"), levels=None,
                   seeds=(0,), overrides: list[str] | None = None) -> list[dict]:
    """Train / reuse every model, write uvim.csv, uvim.md, uvim.png; return the models' metrics."""
    tasks = list(tasks or TASK_LEVELS)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Ctx(0, 1, 0, device)
    runs = []
    for task in tasks:
        level_sets = [list(TASK_LEVELS[task])] + ([list(levels)] if levels and list(levels) != TASK_LEVELS[task] else [])
        for lv in level_sets:
            for q in quantizers:
                for seed in seeds:
                    runs.append((task, q, lv, seed))
    results = []
    for i, (task, q, lv, seed) in enumerate(runs):
        cfg = make_uvim_config(preset, overrides, task=task, quantizer=q, levels=lv)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        mdir = _model_dir(out, task, q, lv, seed)
        done = os.path.join(mdir, "metrics.json")
        if os.path.exists(done):
            with open(done) as f:
                m = json.load(f)
            if m.get("config", {}).get("s1_steps") != cfg.s1_steps or m.get("config", {}).get("lm_steps") != cfg.lm_steps:
                raise ValueError(f"{mdir} holds a model of other settings; choose another --out")
            print(f"[uvim-study] {i + 1}/{len(runs)} {task} {q} {lv} seed {seed}: reused", flush=True)
        else:
            print(f"[uvim-study] {i + 1}/{len(runs)} {task} {q} {lv} seed {seed}: training", flush=True)
            resume = latest_checkpoint(os.path.join(mdir, "stage1")) is not None
            m = train_uvim(cfg, mdir, seed, resume, ctx, preset)
        results.append(m)
    wall = time.time() - t0
    rows = csv_rows(results)
    write_csv(rows, os.path.join(out, "uvim.csv"))
    plot_uvim(results, os.path.join(out, "uvim.png"))
    write_markdown(results, preset, wall, os.path.join(out, "uvim.md"), overrides)
    print(f"[uvim-study] {len(results)} models in {wall:.0f} s ({wall / 60:.1f} min); {os.path.join(out, 'uvim.md')}",
          flush=True)
    return results


def csv_rows(results: list[dict]) -> list[dict]:
    rows = []
    for m in results:
        for src in SOURCES:
            r = m["results"][src]
            for metric, value in r.items():
                if metric == "stderr":
                    continue
                rows.append({"task": m["task"], "quantizer": m["quantizer"], "codebook_size": m["codebook_size"],
                             "code_source": src, "metric": metric, "value": value,
                             "codebook_usage": m["codebook_usage"], "perplexity": m["codebook_perplexity"],
                             "stderr": r["stderr"] if metric == m["metric"] else "",
                             "levels": "-".join(map(str, m["levels"])), "seed": m["seed"]})
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    def write(f):
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    atomic_write(path, write, mode="w")


def _key(m: dict) -> tuple:
    return m["task"], m["quantizer"], tuple(m["levels"])


def claims(results: list[dict]) -> list[str]:
    """The issue's "Must show" items, checked on these results (seed-averaged where seeds repeat)."""
    by = {}
    for m in results:
        by.setdefault(_key(m), []).append(m)
    lines = []
    for task in dict.fromkeys(m["task"] for m in results):
        for (t, q, lv), ms in by.items():
            if t != task:
                continue
            for m in ms:
                c, r, name = m["comparisons"], m["results"], m["metric"]
                sign = 1 if m["higher_is_better"] else -1
                below_oracle = sign * (r["oracle"][name] - r["predicted"][name]) > 0
                lines.append(
                    f"- {task}, {q} {list(lv)}, seed {m['seed']}: predicted vs none {c['predicted_vs_none']['z']:+.1f} SE "
                    f"({'met' if c['predicted_vs_none']['z'] >= 2 else 'NOT met'}: >= 2 SE); "
                    f"below the oracle: {'yes' if below_oracle else 'NO'}; "
                    f"predicted vs shuffled {c['predicted_vs_shuffled']['z']:+.1f} SE "
                    f"({'met' if c['predicted_vs_shuffled']['z'] >= 2 else 'NOT met'}: >= 2 SE)")
        fsq = [m for k, ms in by.items() if k[0] == task and k[1] == "fsq" for m in ms]
        vqu = [m for k, ms in by.items() if k[0] == task and k[1] == "vq-uvim" for m in ms]
        for f in fsq:
            for v in [v for v in vqu if v["levels"] == f["levels"] and v["seed"] == f["seed"]]:
                name = f["metric"]
                a, b = f["results"]["predicted"][name], v["results"]["predicted"][name]
                worse = (b - a) / abs(b) if f["higher_is_better"] else (a - b) / abs(b)
                lines.append(
                    f"- {task} {f['levels']} seed {f['seed']}: FSQ {a:.4f} vs VQ-UViM {b:.4f} ({name}, predicted code): "
                    f"FSQ worse by {100 * worse:+.1f}% ({'met' if worse <= 0.05 else 'NOT met'}: <= 5%); usage FSQ "
                    f"{f['codebook_usage']:.3f} vs VQ-UViM {v['codebook_usage']:.3f} "
                    f"({'met' if f['codebook_usage'] >= max(0.9, v['codebook_usage'] - 0.05) else 'NOT met'}: "
                    f">= max(0.9, VQ - 0.05))")
    return lines


def write_markdown(results: list[dict], preset: str, wall: float, path: str, overrides: list[str] | None = None) -> None:
    changed = f", with {', '.join(f'`{o}`' for o in overrides)}" if overrides else ""
    lines = [f"# UViM study (preset `{preset}`{changed})", "",
             "Ranking metric with each code source, +- one bootstrap standard error over held-out images "
             "(test split). Codebook usage and perplexity: the oracle's codes over the held-out images.", ""]
    for task in dict.fromkeys(m["task"] for m in results):
        ms = [m for m in results if m["task"] == task]
        name = ms[0]["metric"]
        lines += [f"## {task}: {name} ({'higher' if ms[0]['higher_is_better'] else 'lower'} is better)", "",
                  "| quantizer | levels | codes | seed | " + " | ".join(SOURCES) + " | usage | perplexity | "
                  "LM code acc. | LM perplexity |",
                  "|---|---|---:|---:|" + "---:|" * (len(SOURCES) + 4)]
        for m in ms:
            cells = [f"{m['results'][s][name]:.4f} +- {m['results'][s]['stderr']:.4f}" for s in SOURCES]
            splits = f" ({m['vq_splits']} splits)" if m["quantizer"] == "vq-uvim" and "vq_splits" in m else ""
            lines.append(f"| {m['quantizer']}{splits} | {m['levels']} | {m['codebook_size']} | {m['seed']} | "
                         + " | ".join(cells) + f" | {m['codebook_usage']:.3f} | {m['codebook_perplexity']:.1f} | "
                         f"{m['lm']['code_accuracy']:.3f} | {m['lm']['perplexity']:.1f} |")
        others = [k for k in ms[0]["results"]["none"] if k not in (name, "stderr")]
        if others:
            lines += ["", "Other metrics (not ranked): " + "; ".join(
                f"{m['quantizer']} {m['levels']} s{m['seed']}: " + ", ".join(
                    f"{k} " + "/".join(f"{m['results'][s][k]:.4f}" for s in SOURCES) for k in others)
                for m in ms) + f" ({'/'.join(SOURCES)})."]
        lines.append("")
    lines += ["## The issue's claims, checked", ""] + claims(results)
    lines += ["", "Quantizers: " + "; ".join(f"`{k}` = {v}" for k, v in QUANTIZER_LABELS.items()) + ".",
              "Language-model decoding (temperature; 0 = greedy): " + ", ".join(
                  f"{t} {T}" for t, T in dict.fromkeys((m["task"], m["lm"]["temperature"]) for m in results)) + ". "
              f"Held-out images per model: {results[0]['num_test_images']}. "
              f"Time per model (both stages and the evaluation, as measured when it was trained), summed: "
              f"{sum(m['seconds'] for m in results):.0f} s; wall time of this call: {wall:.0f} s.", ""]
    atomic_write(path, lambda f: f.write("\n".join(lines)), mode="w")


def plot_uvim(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(m["task"] for m in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ms = [m for m in results if m["task"] == task]
        width = 0.8 / len(ms)
        for j, m in enumerate(ms):
            name = m["metric"]
            xs = [i + (j - (len(ms) - 1) / 2) * width for i in range(len(SOURCES))]
            ax.bar(xs, [m["results"][s][name] for s in SOURCES], width,
                   yerr=[m["results"][s]["stderr"] for s in SOURCES], capsize=2,
                   label=f"{m['quantizer']} {'-'.join(map(str, m['levels']))} s{m['seed']}")
        ax.set_xticks(range(len(SOURCES)), SOURCES)
        ax.set(title=task, ylabel=f"{ms[0]['metric']} ({'higher' if ms[0]['higher_is_better'] else 'lower'} better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsq-train uvim-study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick preset (a few minutes)")
    size.add_argument("--tiny", action="store_true", help="the tiny preset (CI: seconds)")
    p.add_argument("--quantizers", default="fsq,vq-uvim", help="comma-separated: fsq, vq-uvim, vq")
    p.add_argument("--levels", default=None, help="another level set for every task, e.g. 8,5,5,5")
    p.add_argument("--tasks", default=",".join(TASK_LEVELS), help="comma-separated tasks")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a UViMConfig field")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    preset = "quick" if args.quick else "tiny" if args.tiny else "default"
    torch.set_flush_denormal(True)
    try:
        run_uvim_study(args.out, preset, args.tasks.split(","), args.quantizers.split(","),
                       [int(v) for v in args.levels.split(",")] if args.levels else None,
                       [int(s) for s in args.seeds.split(",")], args.set)
    except ValueError as e:
        print(f"fsq-train uvim-study: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
