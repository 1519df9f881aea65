"""Stages 3-5: score the baseline's heads, select the convolution-like ones, replace them."""
import json
from pathlib import Path
from typing import Dict

import pandas as pd
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend on servers and workers

from convheads import (HeadScores, Selection, model_cost, replace_heads, save_model, score_heads, select_heads,
                       vit_info)

from .config import PipelineConfig
from .inputs import MODEL_FILE, loader, stage_model
from .stage import output_dir

SCORES, SCORES_TABLE, SELECTION, HEATMAP = "scores.pt", "scores.csv", "selection.json", "heatmap.png"


def run_score(cfg: PipelineConfig, out: Path) -> Dict:
    model = stage_model(cfg, "baseline").to(cfg.device)
    batches = loader(cfg, model, "train", cfg.score.batch_size, train=True, augment=False)
    scores = score_heads(model, batches, max_images=cfg.score.max_images)
    torch.save(scores.to_dict(), out / SCORES)
    scores_table(scores).to_csv(out / SCORES_TABLE, index=False)
    return {"num_images": scores.num_images, "sigma_h_min": scores.sigma_h.min().item(),
            "sigma_h_max": scores.sigma_h.max().item()}


def scores_table(scores: HeadScores) -> pd.DataFrame:
    depth, heads = scores.sigma_h.shape
    return pd.DataFrame([{"block": b, "head": h, "sigma_h": scores.sigma_h[b, h].item(),
                          "sigma_b": scores.sigma_b[b].item()} for b in range(depth) for h in range(heads)])


def load_scores(cfg: PipelineConfig) -> HeadScores:
    return HeadScores.from_dict(torch.load(output_dir(cfg, "score") / SCORES, weights_only=True))


def run_select(cfg: PipelineConfig, out: Path) -> Dict:
    scores, s = load_scores(cfg), cfg.select
    depth, num_heads = scores.sigma_h.shape
    if s.blocks is not None:
        selection = Selection.from_blocks(s.blocks, num_heads=num_heads, depth=depth)
        selection.check(depth, num_heads)
    else:
        selection = select_heads(scores, count=s.count, fraction=None if s.count else s.fraction,
                                 granularity=s.granularity)
    (out / SELECTION).write_text(selection.to_json() + "\n")
    plot_scores(scores, selection, out / HEATMAP)
    return {"heads_replaced": selection.num_replaced, "heads_total": depth * num_heads,
            "blocks_touched": len(selection.heads),
            "whole_blocks": sorted(b for b, h in selection.heads.items() if len(h) == num_heads)}


def load_selection(cfg: PipelineConfig) -> Selection:
    return Selection.from_dict(json.loads((output_dir(cfg, "select") / SELECTION).read_text()))


def plot_scores(scores: HeadScores, selection: Selection, path: Path) -> None:
    """Sigma_h per block and head (selected heads crossed out) beside Sigma_b per block."""
    depth, heads = scores.sigma_h.shape
    fig = Figure(figsize=(4 + 0.5 * heads, 1.5 + 0.4 * depth), layout="constrained")
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [heads, 3]})
    im = ax.imshow(scores.sigma_h.numpy(), cmap="viridis", aspect="auto")
    for b, hs in selection.heads.items():
        ax.scatter(hs, [b] * len(hs), marker="x", color="red", s=60)
    ax.set(xlabel="head", ylabel="block", xticks=range(heads), yticks=range(depth),
           title=f"Sigma_h ({selection.num_replaced} of {depth * heads} heads replaced: x)")
    fig.colorbar(im, ax=ax, label="Sigma_h (low = convolution-like)")
    bx.barh(range(depth), scores.sigma_b.numpy(),
            color=["red" if len(selection.heads.get(b, [])) == heads else "grey" for b in range(depth)])
    bx.set(xlabel="Sigma_b", yticks=range(depth), ylim=(depth - 0.5, -0.5), title="block mean")
    fig.savefig(path, dpi=120)


def run_replace(cfg: PipelineConfig, out: Path) -> Dict:
    model = stage_model(cfg, "baseline")
    before = model_cost(model)
    r = cfg.replace
    replace_heads(model, load_selection(cfg), kernel_size=r.kernel_size, init=r.init, variant=r.variant,
                  scores=load_scores(cfg) if r.init == "attention" else None)
    save_model(model, out / MODEL_FILE)
    after = model_cost(model)
    return {"params_before": before.params, "params_after": after.params,
            "gmacs_before": before.gmacs, "gmacs_after": after.gmacs, "depth": vit_info(model).depth}
