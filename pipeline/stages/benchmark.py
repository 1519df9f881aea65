"""Stage benchmark: latency and throughput of the baseline vs the compressed model in each
configured runtime, the two models timed interleaved; the first runtime gives the headline speedup.

onnxruntime times the models exported to ONNX (as deployed) in a process of its own (spinning off,
PyTorch's thread count: convheads.engine.timing explains why); onnxruntime-int8 the same exports
quantized to INT8, calibrated on training images (the table's `quantization` column and the summary's
`int8_quantization` say whether static or dynamic quantization was used); eager and compile time
them in PyTorch.
"""
import tempfile
from pathlib import Path
from typing import Dict

import pandas as pd
import torch

from convheads import model_cost, vit_info
from convheads.engine.timing import OnnxTimer, latency_stats, time_in_runtime
from convheads.precision import resolve_device
from convheads.quantize import Quantized

from ..artifacts import MODELS, stage_model
from ..config import PipelineConfig
from ..loaders import calibration_batches
from ..runner import Stage, write_json

BENCHMARK, BENCHMARK_TABLE = "benchmark.json", "benchmark.csv"


def run(cfg: PipelineConfig, out: Path) -> Dict:
    b = cfg.benchmark
    if b.threads:
        torch.set_num_threads(b.threads)
    device = resolve_device(cfg.device)
    models = {name: stage_model(cfg, MODELS[name]).to(device) for name in ("baseline", "compressed")}
    costs = {name: model_cost(m) for name, m in models.items()}
    size = vit_info(models["baseline"]).img_size  # segmentation: segmentation.image_size
    rows, quantization = [], {}
    runtimes = cfg.benchmark_runtimes
    # the INT8 exports have static shapes: each batch size is calibrated on whole batches of its size
    calibration = (calibration_batches(cfg, models["baseline"])
                   if cfg.int8 else None)
    with tempfile.TemporaryDirectory() as tmp, OnnxTimer() as onnx:
        for runtime in runtimes:
            for batch_size in b.batch_sizes:
                x = torch.randn(batch_size, 3, *size, device=device)
                quantized: Dict[str, Quantized] = {}
                times = time_in_runtime(models, runtime, x, Path(tmp), onnx, b.warmup, b.repeats, cfg.precision,
                                        calibration, quantized)
                for name, t in times.items():
                    q = quantized.get(name)
                    rows.append({"runtime": runtime, "model": name, **latency_stats(t, batch_size),
                                 "param_count": costs[name].params, "infer_gmacs": costs[name].gmacs,
                                 "quantization": q.method if q else ""})
                    if q:
                        quantization[f"{name}_b{batch_size}"] = q.method
                        if q.fallback:
                            print(f"benchmark: {name} at batch {batch_size} quantized dynamically ({q.fallback})")
    table = pd.DataFrame(rows)
    table.to_csv(out / BENCHMARK_TABLE, index=False)
    result = {"runtime": runtimes[0], "runtimes": runtimes, "threads": torch.get_num_threads(),
              "device": device, "precision": cfg.precision, "repeats": b.repeats, "img_size": list(size),
              "params_ratio": costs["compressed"].params / costs["baseline"].params,
              "macs_ratio": costs["compressed"].macs / costs["baseline"].macs,
              **{f"{name}_params": c.params for name, c in costs.items()},
              **{f"{name}_gmacs": c.gmacs for name, c in costs.items()}}
    for runtime in runtimes:
        for batch_size in b.batch_sizes:
            t = table[(table.runtime == runtime) & (table.batch_size == batch_size)].set_index("model")
            speedup = t.infer_step_time["baseline"] / t.infer_step_time["compressed"]
            result[f"{runtime}_speedup_b{batch_size}"] = speedup
            if runtime != runtimes[0]:
                continue  # the headline runtime's numbers also go under the plain keys
            result[f"speedup_b{batch_size}"] = speedup
            for name in models:
                result[f"{name}_b{batch_size}_ms"] = t.infer_step_time[name]
                result[f"{name}_b{batch_size}_p90_ms"] = t.infer_step_time_p90[name]
                result[f"{name}_b{batch_size}_samples_per_sec"] = t.infer_samples_per_sec[name]
    if quantization:
        result["int8_quantization"] = quantization
    write_json(out / BENCHMARK, result)
    return result


STAGE = Stage("benchmark", run, ("benchmark", "device", "precision"), needs=("baseline", "recover"))
