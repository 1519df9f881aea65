"""Stage score: score every head of the fine-tuned baseline (Sigma_h, Sigma_b) on training images."""
from pathlib import Path
from typing import Dict

import pandas as pd
import torch

from convheads import HeadScores, score_heads
from convheads.precision import resolve_device

from ..artifacts import SCORES, SCORES_TABLE, stage_model
from ..config import PipelineConfig
from ..loaders import loader
from ..runner import Stage


def run(cfg: PipelineConfig, out: Path) -> Dict:
    model = stage_model(cfg, "baseline").to(resolve_device(cfg.device))
    batches = loader(cfg, model, "train", cfg.score.batch_size, train=True)
    scores = score_heads(model, batches, max_images=cfg.score.max_images, precision=cfg.precision)
    torch.save(scores.to_dict(), out / SCORES)
    scores_table(scores).to_csv(out / SCORES_TABLE, index=False)
    return {"num_images": scores.num_images, "sigma_h_min": scores.sigma_h.min().item(),
            "sigma_h_max": scores.sigma_h.max().item()}


def scores_table(scores: HeadScores) -> pd.DataFrame:
    depth, heads = scores.sigma_h.shape
    return pd.DataFrame([{"block": b, "head": h, "sigma_h": scores.sigma_h[b, h].item(),
                          "sigma_b": scores.sigma_b[b].item()} for b in range(depth) for h in range(heads)])


STAGE = Stage("score", run, ("score", "device", "precision"), needs=("baseline",))
