"""Stage score: score every head of the fine-tuned baseline (Sigma_h, Sigma_b) on training images, and how
local each head's attention is (its share inside the 3 x 3 window, convheads.locality)."""
from pathlib import Path
from typing import Dict

import pandas as pd
import torch

from convheads import HeadScores, score_heads
from convheads.locality import local_share, uniform_share
from convheads.precision import resolve_device

from ..artifacts import SCORES, SCORES_TABLE, stage_model
from ..config import PipelineConfig
from ..loaders import loader
from ..plots import plot_locality
from ..runner import Stage

LOCAL_WINDOW = 3   # the method's default kernel size: how local a head must be for it
LOCALITY_PLOT = "locality.png"


def run(cfg: PipelineConfig, out: Path) -> Dict:
    model = stage_model(cfg, "baseline").to(resolve_device(cfg.device))
    batches = loader(cfg, model, "train", cfg.score.batch_size, train=True)
    scores = score_heads(model, batches, max_images=cfg.score.max_images, precision=cfg.precision,
                         tokens=cfg.score.sigma_tokens)
    torch.save(scores.to_dict(), out / SCORES)
    local = local_share(scores, LOCAL_WINDOW)
    scores_table(scores, local).to_csv(out / SCORES_TABLE, index=False)
    uniform = uniform_share(scores.grid_size, scores.num_prefix_tokens, LOCAL_WINDOW)
    plot_locality(local, scores.sigma_h, uniform, out / LOCALITY_PLOT, f"fine-tuned baseline, {scores.num_images} "
                  f"training images")
    return {"num_images": scores.num_images, "sigma_h_min": scores.sigma_h.min().item(),
            "sigma_h_max": scores.sigma_h.max().item(),
            # heads with at least half their attention on the 3 x 3 neighbourhood: what a convolution can be
            "local_heads": int((local >= 0.5).sum()), "local_share_max": local.max().item(),
            "uniform_share": uniform}


def scores_table(scores: HeadScores, local: torch.Tensor) -> pd.DataFrame:
    """One row per head; local: [depth, heads] local_share."""
    depth, heads = scores.sigma_h.shape
    return pd.DataFrame([{"block": b, "head": h, "sigma_h": scores.sigma_h[b, h].item(),
                          "sigma_b": scores.sigma_b[b].item(), "local_share": local[b, h].item()}
                         for b in range(depth) for h in range(heads)])


STAGE = Stage("score", run, ("score", "device", "precision"), needs=("baseline",))
