"""Stage 7: accuracy of the baseline, replaced and recovered models on the test split."""
from pathlib import Path
from typing import Dict

import pandas as pd

from convheads.evaluation import evaluate
from convheads.precision import resolve_device

from .config import PipelineConfig
from .inputs import loader, stage_model
from .runner import write_json

# What is compared: the stage whose model it is.
MODELS = {"baseline": "baseline", "replaced": "replace", "compressed": "recover"}
METRICS, TABLE = "metrics.json", "metrics.csv"


def run(cfg: PipelineConfig, out: Path) -> Dict:
    results = {}
    for name, stage in MODELS.items():
        model = stage_model(cfg, stage)
        metrics = evaluate(model, loader(cfg, model, "test", cfg.evaluate.batch_size), resolve_device(cfg.device),
                           precision=cfg.precision)
        results[name] = {k: metrics[k] for k in ("top1", "top5", "loss")}
    results["top1_drop"] = results["baseline"]["top1"] - results["compressed"]["top1"]
    results["num_images"] = metrics["num_images"]
    write_json(out / METRICS, results)
    pd.DataFrame([{"model": n, **results[n]} for n in MODELS]).to_csv(out / TABLE, index=False)
    return results
