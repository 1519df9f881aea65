"""Stage 8: latency and throughput of the baseline vs the compressed model in each configured
runtime, the two models timed interleaved; the first runtime gives the headline speedup.

onnxruntime times the models exported to ONNX (as deployed; spinning off, PyTorch's thread
count, never interleaved with PyTorch), eager and compile time them in PyTorch.
"""
import tempfile
from pathlib import Path
from typing import Callable, Dict

import pandas as pd
import torch
from torch import nn

from benchmarks.timing import latency_stats, time_models
from convheads import export_onnx, model_cost
from convheads.export import OnnxModel

from .config import PipelineConfig
from .evaluate import MODELS
from .inputs import stage_model
from .runner import write_json

BENCHMARK, BENCHMARK_TABLE = "benchmark.json", "benchmark.csv"


def runners(models: Dict[str, nn.Module], runtime: str, batch_size: int, workdir: Path) -> Dict[str, Callable]:
    """Each model as `runtime` runs it, for inputs of `batch_size` (ONNX exports have static shapes)."""
    if runtime == "eager":
        return models
    if runtime == "compile":
        return {name: torch.compile(m) for name, m in models.items()}
    return {name: OnnxModel(export_onnx(m, workdir / f"{name}_b{batch_size}.onnx", batch_size=batch_size))
            for name, m in models.items()}


def run(cfg: PipelineConfig, out: Path) -> Dict:
    b = cfg.benchmark
    if b.threads:
        torch.set_num_threads(b.threads)
    models = {name: stage_model(cfg, MODELS[name]).to(cfg.device) for name in ("baseline", "compressed")}
    costs = {name: model_cost(m) for name, m in models.items()}
    size = models["baseline"].patch_embed.img_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in b.runtimes:
            for batch_size in b.batch_sizes:
                x = torch.randn(batch_size, 3, *size, device=cfg.device)
                run_with = runners(models, runtime, batch_size, Path(tmp))
                times = time_models(run_with, x, warmup=b.warmup, repeats=b.repeats, progress=True)
                for name, t in times.items():
                    rows.append({"runtime": runtime, "model": name, **latency_stats(t, batch_size),
                                 "param_count": costs[name].params, "infer_gmacs": costs[name].gmacs})
    table = pd.DataFrame(rows)
    table.to_csv(out / BENCHMARK_TABLE, index=False)
    result = {"runtime": b.runtimes[0], "runtimes": list(b.runtimes), "threads": torch.get_num_threads(),
              "device": cfg.device, "repeats": b.repeats,
              "params_ratio": costs["compressed"].params / costs["baseline"].params,
              "macs_ratio": costs["compressed"].macs / costs["baseline"].macs,
              **{f"{name}_params": c.params for name, c in costs.items()},
              **{f"{name}_gmacs": c.gmacs for name, c in costs.items()}}
    for runtime in b.runtimes:
        for batch_size in b.batch_sizes:
            t = table[(table.runtime == runtime) & (table.batch_size == batch_size)].set_index("model")
            speedup = t.infer_step_time["baseline"] / t.infer_step_time["compressed"]
            result[f"{runtime}_speedup_b{batch_size}"] = speedup
            if runtime != b.runtimes[0]:
                continue  # the headline runtime's numbers also go under the plain keys
            result[f"speedup_b{batch_size}"] = speedup
            for name in models:
                result[f"{name}_b{batch_size}_ms"] = t.infer_step_time[name]
                result[f"{name}_b{batch_size}_p90_ms"] = t.infer_step_time_p90[name]
                result[f"{name}_b{batch_size}_samples_per_sec"] = t.infer_samples_per_sec[name]
    write_json(out / BENCHMARK, result)
    return result
