"""Stage 4: select the heads (or whole blocks) to replace, and draw the scores with the choice."""
import json
from pathlib import Path
from typing import Dict

from matplotlib.figure import Figure  # no pyplot: no GUI backend on servers and workers

from convheads import HeadScores, Selection, select_heads

from .config import PipelineConfig
from .runner import output_dir
from .score import load_scores

SELECTION, HEATMAP = "selection.json", "heatmap.png"


def run(cfg: PipelineConfig, out: Path) -> Dict:
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
