"""Stage 8: latency and throughput of the baseline vs the compressed model, timed interleaved."""
from pathlib import Path
from typing import Dict

import pandas as pd
import torch

from benchmarks.timing import latency_stats, time_models
from convheads import model_cost, vit_info

from .config import PipelineConfig
from .evaluate import MODELS
from .inputs import stage_model
from .runner import write_json

BENCHMARK, BENCHMARK_TABLE = "benchmark.json", "benchmark.csv"


def run(cfg: PipelineConfig, out: Path) -> Dict:
    b = cfg.benchmark
    if b.threads:
        torch.set_num_threads(b.threads)
    models = {name: stage_model(cfg, MODELS[name]).to(cfg.device) for name in ("baseline", "compressed")}
    costs = {name: model_cost(m) for name, m in models.items()}
    rows = []
    size = vit_info(models["baseline"]).img_size  # segmentation: segmentation.image_size
    for batch_size in b.batch_sizes:
        x = torch.randn(batch_size, 3, *size, device=cfg.device)
        times = time_models(models, x, warmup=b.warmup, repeats=b.repeats, progress=True)
        for name, t in times.items():
            rows.append({"model": name, **latency_stats(t, batch_size), "param_count": costs[name].params,
                         "infer_gmacs": costs[name].gmacs})
    table = pd.DataFrame(rows)
    table.to_csv(out / BENCHMARK_TABLE, index=False)
    result = {"threads": torch.get_num_threads(), "device": cfg.device, "repeats": b.repeats, "img_size": list(size),
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
