"""Stages 7 and 8: accuracy of every model on the test split; latency of baseline vs compressed."""
from pathlib import Path
from typing import Dict

import pandas as pd
import torch

from convheads import model_cost
from convheads.benchmark import latency_stats, time_models
from convheads.evaluation import evaluate

from .config import PipelineConfig
from .inputs import loader, stage_model
from .stage import write_json

# What is compared: the stage whose model it is.
MODELS = {"baseline": "baseline", "replaced": "replace", "compressed": "recover"}
METRICS, TABLE, BENCHMARK, BENCHMARK_TABLE = "metrics.json", "metrics.csv", "benchmark.json", "benchmark.csv"


def run_evaluate(cfg: PipelineConfig, out: Path) -> Dict:
    results = {}
    for name, stage in MODELS.items():
        model = stage_model(cfg, stage)
        metrics = evaluate(model, loader(cfg, model, "test", cfg.evaluate.batch_size), cfg.device)
        results[name] = {k: metrics[k] for k in ("top1", "top5", "loss")}
    results["top1_drop"] = results["baseline"]["top1"] - results["compressed"]["top1"]
    results["num_images"] = metrics["num_images"]
    write_json(out / METRICS, results)
    pd.DataFrame([{"model": n, **results[n]} for n in MODELS]).to_csv(out / TABLE, index=False)
    return results


def run_benchmark(cfg: PipelineConfig, out: Path) -> Dict:
    b = cfg.benchmark
    if b.threads:
        torch.set_num_threads(b.threads)
    models = {name: stage_model(cfg, MODELS[name]).to(cfg.device) for name in ("baseline", "compressed")}
    costs = {name: model_cost(m) for name, m in models.items()}
    rows = []
    for batch_size in b.batch_sizes:
        size = models["baseline"].patch_embed.img_size
        x = torch.randn(batch_size, 3, *size, device=cfg.device)
        times = time_models(models, x, warmup=b.warmup, repeats=b.repeats, progress=True)
        for name, t in times.items():
            rows.append({"model": name, **latency_stats(t, batch_size), "param_count": costs[name].params,
                         "infer_gmacs": costs[name].gmacs})
    table = pd.DataFrame(rows)
    table.to_csv(out / BENCHMARK_TABLE, index=False)
    result = {"threads": torch.get_num_threads(), "device": cfg.device, "repeats": b.repeats,
              "params_ratio": costs["compressed"].params / costs["baseline"].params,
              "macs_ratio": costs["compressed"].macs / costs["baseline"].macs,
              **{f"{name}_params": c.params for name, c in costs.items()},
              **{f"{name}_gmacs": c.gmacs for name, c in costs.items()}}
    for batch_size in b.batch_sizes:
        t = table[table.batch_size == batch_size].set_index("model")
        result[f"speedup_b{batch_size}"] = t.infer_step_time["baseline"] / t.infer_step_time["compressed"]
        for name in models:
            result[f"{name}_b{batch_size}_ms"] = t.infer_step_time[name]
            result[f"{name}_b{batch_size}_p90_ms"] = t.infer_step_time_p90[name]
            result[f"{name}_b{batch_size}_samples_per_sec"] = t.infer_samples_per_sec[name]
    write_json(out / BENCHMARK, result)
    return result
