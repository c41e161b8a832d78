"""UViM's held-out evaluation: the task metric with each code source, standard errors, codebook
usage, the language model's code accuracy and perplexity, and the PNG grid.

Code sources, all decoded by the same base model f(x, z) (EMA weights):
    predicted  the language model's code, sampled at cfg.temperature (0 = greedy): the UViM output
    oracle     the restricted oracle's code (sees the target): the upper bound
    none       every token dropped (the mask channel all zero): what x alone gives
    shuffled   the oracle code of another held-out image (image i gets image i+1's): does the
               language model read x, or could any plausible code do as well?
Standard errors come from a paired bootstrap over held-out images (the same resampled images for
every source), for each source's metric and for the differences predicted - other.
"""

from __future__ import annotations

import torch

from .. import uvim_tasks
from .figures import save_grid
from .metrics import code_counts, usage_and_perplexity

__all__ = ["SOURCES", "evaluate_uvim", "summary"]

SOURCES = ("none", "oracle", "predicted", "shuffled")
GRID_IMAGES = 8


@torch.no_grad()
def _outputs(model, task, x, codes, batch: int = 256):
    """Predictions (task's stored form) of f(x, z) for code indices `codes` (N, h*w) or None."""
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        if codes is None:
            z = None
        else:
            c = codes[i:i + batch]
            h = int(round(c.shape[1] ** 0.5))
            z = model.codes(c.view(-1, h, c.shape[1] // h).to(x.device))
        out.append(task.predict(model.decode(xb, z)).cpu())
    return torch.cat(out)


def _signed(task, value: float) -> float:
    """A metric value oriented so that larger is better."""
    return value if task.higher_is_better else -value


@torch.no_grad()
def evaluate_uvim(s1_dir: str, lm_dir: str, cfg, seed: int, device, grid_path: str | None = None) -> dict:
    from .uvim import lm_input, load_lm, load_stage_one, oracle_codes
    from ..models.uvim_lm import lm_loss

    task = uvim_tasks.get_task(cfg.task)
    model, _, _ = load_stage_one(s1_dir, device)
    lm = load_lm(lm_dir, device)
    test = uvim_tasks.generate(cfg.task, cfg.num_test, seed, "test")
    x = task.x(test, torch.arange(len(test))).to(device)
    oracle = oracle_codes(model, task, test, device)
    g = torch.Generator().manual_seed(seed + 12345)
    lm_x = torch.cat([lm_input(cfg, model, x[i:i + 256]) for i in range(0, len(test), 256)])
    predicted = torch.cat([lm.generate(lm_x[i:i + 256], cfg.temperature, g).cpu() for i in range(0, len(test), 256)])
    logits = torch.cat([lm(lm_x[i:i + 256], oracle[i:i + 256].to(device)).cpu() for i in range(0, len(test), 256)])
    ce, acc = lm_loss(logits, oracle)
    codes = {"none": None, "oracle": oracle, "predicted": predicted, "shuffled": oracle.roll(-1, 0)}
    preds = {k: _outputs(model, task, x, c) for k, c in codes.items()}
    stats = {k: task.image_stats(p, test.y, test.fg) for k, p in preds.items()}
    metric = task.metric
    results = {}
    for k in SOURCES:
        values = task.aggregate(stats[k])
        boot = uvim_tasks.bootstrap(lambda s: task.aggregate(s)[metric], [stats[k]], cfg.bootstrap, seed)
        results[k] = values | {"stderr": float(boot.std())}
    comparisons = {}
    for other in ("none", "shuffled", "oracle"):
        # gain > 0: the predicted code is better than `other` on the ranking metric
        boot = uvim_tasks.bootstrap(
            lambda a, b: _signed(task, task.aggregate(a)[metric]) - _signed(task, task.aggregate(b)[metric]),
            [stats["predicted"], stats[other]], cfg.bootstrap, seed)
        gain = _signed(task, results["predicted"][metric]) - _signed(task, results[other][metric])
        comparisons[f"predicted_vs_{other}"] = {"gain": gain, "stderr": float(boot.std()),
                                                "z": gain / max(float(boot.std()), 1e-12)}
    usage, perplexity = usage_and_perplexity(code_counts(oracle, model.codebook_size))
    pred_usage, pred_perplexity = usage_and_perplexity(code_counts(predicted, model.codebook_size))
    if grid_path:
        n = min(GRID_IMAGES, len(test))
        xin = test.x[:n].float() / 255
        rows = [xin.expand(-1, 3, -1, -1) if xin.shape[1] == 1 else xin, task.to_rgb(test.y[:n])]
        rows += [task.to_rgb(preds[k][:n]) for k in ("predicted", "oracle", "none", "shuffled")]
        save_grid(torch.cat(rows).clamp(0, 1), n, grid_path)
    return {
        "task": cfg.task, "quantizer": cfg.quantizer, "levels": list(cfg.levels),
        "codebook_size": model.codebook_size, "metric": metric, "higher_is_better": task.higher_is_better,
        "results": results, "comparisons": comparisons,
        "codebook_usage": usage, "codebook_perplexity": perplexity, "usage_tokens": int(oracle.numel()),
        "predicted_code_usage": pred_usage, "predicted_code_perplexity": pred_perplexity,
        "lm": {"code_accuracy": float(acc), "cross_entropy": float(ce), "perplexity": float(ce.exp()),
               "sampled_token_agreement": float((predicted == oracle).float().mean()),
               "temperature": cfg.temperature},
        "vq_splits": int(getattr(model.quantizer, "num_splits", torch.zeros(())).item()),
        "num_test_images": len(test),
        "grid_rows": ["input", "target", "predicted (LM code)", "oracle code", "no code", "shuffled code"],
    }


def summary(m: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"UViM {m['task']} / {m['quantizer']} {m['levels']} ({m['codebook_size']} codes): {m['metric']} "
             f"({'higher' if m['higher_is_better'] else 'lower'} is better)"]
    for k in SOURCES:
        r = m["results"][k]
        lines.append(f"  {k:9s} {r[m['metric']]:.4f} +- {r['stderr']:.4f}   "
                     + " ".join(f"{a}={b:.4f}" for a, b in r.items() if a not in (m["metric"], "stderr")))
    for k, c in m["comparisons"].items():
        lines.append(f"  {k}: gain {c['gain']:+.4f} ({c['z']:+.1f} SE)")
    lines.append(f"  codebook usage {m['codebook_usage']:.3f}, perplexity {m['codebook_perplexity']:.1f} "
                 f"over {m['usage_tokens']} held-out tokens; LM code accuracy {m['lm']['code_accuracy']:.3f}, "
                 f"perplexity {m['lm']['perplexity']:.1f}")
    return "\n".join(lines)
