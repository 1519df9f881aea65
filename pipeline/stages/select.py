"""Stage select: select the heads (or whole blocks) to replace, and show the scores with the choice:
Sigma_h and the fit score per head (heads.csv, heatmap.png)."""
from pathlib import Path
from typing import Dict

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend on servers and workers

from convheads import HeadScores, Selection, select_heads
from convheads.fitting import FITTED, fit_scores

from ..artifacts import SELECTION, load_scores
from ..config import DSP, PipelineConfig
from ..runner import Stage

HEATMAP, HEADS_TABLE = "heatmap.png", "heads.csv"


def run(cfg: PipelineConfig, out: Path) -> Dict:
    scores, s, k = load_scores(cfg), cfg.select, cfg.replace.kernel_size
    depth, num_heads = scores.sigma_h.shape
    if s.blocks is not None:
        selection = Selection.from_blocks(s.blocks, num_heads=num_heads, depth=depth)
        selection.check(depth, num_heads)
    else:  # dsp learns its choice in recovery: here, Sigma's choice at the same budget (the replaced model's)
        selection = select_heads(scores, count=s.count, fraction=None if s.count else s.fraction,
                                 granularity=s.granularity, method="sigma" if s.method == DSP else s.method,
                                 kernel_size=k, seed=cfg.seed, variant=cfg.replace.variant)
    (out / SELECTION).write_text(selection.to_json() + "\n")
    fit = fit_scores(scores, k, fitted_variant(cfg.replace.variant))
    heads_table(scores, fit, selection).to_csv(out / HEADS_TABLE, index=False)
    plot_scores(scores, selection, out / HEATMAP, fit, k)
    return {"heads_replaced": selection.num_replaced, "heads_total": depth * num_heads,
            "blocks_touched": len(selection.heads), "method": s.method if s.blocks is None else "blocks",
            "whole_blocks": sorted(b for b, h in selection.heads.items() if len(h) == num_heads),
            "fit_selected_mean": float(sum(fit[b, h].item() for b, hs in selection.heads.items() for h in hs)
                                       / selection.num_replaced)}


def fitted_variant(variant: str) -> str:
    """Whose fit heads.csv and the heat map show: the variant's, or the depthwise one's (identity,
    drop and ensemble have no fit of their own)."""
    return variant if variant in FITTED else "depthwise"


def heads_table(scores: HeadScores, fit, selection: Selection) -> pd.DataFrame:
    """One row per head: Sigma_h, Sigma_b, the fit score, whether it is selected."""
    depth, heads = scores.sigma_h.shape
    return pd.DataFrame([{"block": b, "head": h, "sigma_h": scores.sigma_h[b, h].item(),
                          "sigma_b": scores.sigma_b[b].item(),
                          "fit": fit[b, h].item(), "fit_b": fit[b].mean().item(),
                          "selected": h in selection.heads.get(b, [])}
                         for b in range(depth) for h in range(heads)])


def plot_scores(scores: HeadScores, selection: Selection, path: Path, fit, kernel_size: int = 3) -> None:
    """Sigma_h per block and head (selected heads crossed out), the fit score beside it, and Sigma_b per block."""
    depth, heads = scores.sigma_h.shape
    maps = [(scores.sigma_h, "viridis", "Sigma_h", "Sigma_h (low = convolution-like)"),
            (fit, "magma", f"fit of the {kernel_size}x{kernel_size} replacement", "fit of E[A] (high = representable)")]
    fig = Figure(figsize=(4 + 0.5 * heads * len(maps), 1.5 + 0.4 * depth), layout="constrained")
    axes = fig.subplots(1, len(maps) + 1, gridspec_kw={"width_ratios": [heads] * len(maps) + [3]})
    for ax, (values, cmap, name, label) in zip(axes, maps):
        im = ax.imshow(values.numpy(), cmap=cmap, aspect="auto")
        for b, hs in selection.heads.items():
            ax.scatter(hs, [b] * len(hs), marker="x", color="red", s=60)
        ax.set(xlabel="head", ylabel="block", xticks=range(heads), yticks=range(depth), title=name)
        fig.colorbar(im, ax=ax, label=label)
    axes[0].set_title(f"Sigma_h ({selection.num_replaced} of {depth * heads} heads replaced: x)")
    bx = axes[-1]
    bx.barh(range(depth), scores.sigma_b.numpy(),
            color=["red" if len(selection.heads.get(b, [])) == heads else "grey" for b in range(depth)])
    bx.set(xlabel="Sigma_b", yticks=range(depth), ylim=(depth - 0.5, -0.5), title="block mean")
    fig.savefig(path, dpi=120)


STAGE = Stage("select", run, ("select", "replace"), needs=("score",))  # fit: replace.kernel_size
