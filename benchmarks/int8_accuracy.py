"""What INT8 costs in accuracy on the default: the compressed model's top-1 in float32 and as deployed in INT8.

    python -m benchmarks.int8_accuracy                     # the photo testbed, seed 0 (about 10 minutes on 2 cores)
    python -m benchmarks.int8_accuracy --seeds 0 1 2       # three trained models
    python -m benchmarks.int8_accuracy --tables-only       # the table from finished runs
    python -m benchmarks.int8_accuracy recover.epochs=1    # configuration overrides

Each seed runs the compression flow (flows.compress) in its own outputs folder
(outputs/int8_accuracy/seed<S>: baseline, recovery and all) with INT8 as the deployment runtime
(benchmark.runtimes=[onnxruntime-int8,onnxruntime]), so the evaluate stage scores the quantized
model (static QDQ, calibrated on training images) on the same test images as the float32 one.
These runs are tracked in MLflow but register nothing.
On each test image and seed, 1 if the model is right, 0 if not: the drop is float32's top-1 minus
INT8's, in points, with its 95% paired bootstrap interval over the test images (benchmarks.claims).
A row per seed and one for all seeds together. Writes results/int8_accuracy.csv with its stamp,
shown on docs/results/speed.md. Classification only.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

from convheads import ConvHeadsError
from flows import checked_config
from pipeline.artifacts import INT8_MODEL
from pipeline.config import PipelineConfig
from pipeline.runner import output_dir
from pipeline.stages.evaluate import METRICS, PREDICTIONS

from .claims import paired, per_image_config
from .results import write_results

INT8_FIRST = "benchmark.runtimes=[onnxruntime-int8,onnxruntime]"
RUNS_DIR = "int8_accuracy"
COLUMNS = ["seeds", "images", "quantization", "top1_fp32", "top1_int8", "drop", "ci_low", "ci_high", "agreement"]


def seed_overrides(base: PipelineConfig, seed: int) -> List[str]:
    """One seed's run: its own outputs folder (the seeds' runs must not overwrite each other's
    predictions), INT8 evaluated, and no registry version (a measurement, not a candidate)."""
    folder = Path(base.paths.outputs) / RUNS_DIR / f"seed{seed}"
    return [INT8_FIRST, f"seed={seed}", f"paths.outputs={folder}", "registry.enabled=false"]


def correct(cfg: PipelineConfig) -> pd.DataFrame:
    """[test images] x {compressed, compressed_int8}: 1 where that model is right."""
    path = output_dir(cfg, "evaluate") / PREDICTIONS
    table = pd.read_csv(path, index_col="image") if path.is_file() else None
    if table is None or INT8_MODEL not in table:
        raise ConvHeadsError(f"{path} has no INT8 predictions for seed {cfg.seed}: run python -m "
                             f"benchmarks.int8_accuracy without --tables-only")
    return pd.DataFrame({m: (table[m] == table["label"]).astype(np.int8) for m in ("compressed", INT8_MODEL)}
                        ).assign(agree=(table["compressed"] == table[INT8_MODEL]).astype(np.int8))


def row(seeds: str, tables: List[pd.DataFrame], quantization: str) -> dict:
    fp32 = np.stack([t["compressed"].to_numpy() for t in tables])
    int8 = np.stack([t[INT8_MODEL].to_numpy() for t in tables])
    agree = np.stack([t["agree"].to_numpy() for t in tables])
    drop = paired(fp32, int8)
    return {"seeds": seeds, "images": fp32.shape[1], "quantization": quantization, "top1_fp32": 100 * fp32.mean(),
            "top1_int8": 100 * int8.mean(), "drop": drop["difference"], "ci_low": drop["ci_low"],
            "ci_high": drop["ci_high"], "agreement": 100 * agree.mean()}


def tables(configs: Dict[int, PipelineConfig]) -> pd.DataFrame:
    """A row per seed's finished run ({seed: its configuration}), and one for all seeds together."""
    correct_by_seed = {seed: correct(cfg) for seed, cfg in configs.items()}
    if len({len(t) for t in correct_by_seed.values()}) > 1:
        raise ConvHeadsError("the seeds' runs were evaluated on different test splits; rerun them")
    methods = {seed: json.loads((output_dir(cfg, "evaluate") / METRICS).read_text())["int8_quantization"]
               for seed, cfg in configs.items()}
    rows = [row(str(seed), [t], methods[seed]) for seed, t in correct_by_seed.items()]
    if len(rows) > 1:
        rows.append(row("all", list(correct_by_seed.values()), "/".join(sorted(set(methods.values())))))
    return pd.DataFrame(rows)[COLUMNS].round(3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="presets/photos.yaml", help="default: the photo testbed (make run's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tables-only", action="store_true", help="do not run the flow: read the finished runs")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    base = checked_config(args.params, args.overrides)
    if base is None:
        return 2
    configs = {}
    for seed in args.seeds:
        overrides = [*args.overrides, *seed_overrides(base, seed)]
        cfg = per_image_config(args.params, overrides, "the INT8 drop's tables")
        if cfg is None:
            return 2
        if not args.tables_only:
            from flows.compress import main as compress
            status = compress(["--params", args.params, *overrides])
            if status:
                return status
        configs[seed] = cfg
    try:
        table = tables(configs)
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = " ".join(["python -m benchmarks.int8_accuracy", *(["--params", args.params]
                        if args.params != "presets/photos.yaml" else []),
                        *(["--seeds", *map(str, args.seeds)] if args.seeds != [0] else []), *args.overrides])
    path = write_results("int8_accuracy", table, "INT8 accuracy on the default: the compressed model in float32 "
                         "and as deployed in INT8, on the same test images", "speed", command=command,
                         notes="top1 in %; drop: float32's top-1 minus INT8's, in points; ci: its 95% paired "
                               "bootstrap interval over the test images; agreement: % of test images where "
                               "both predict the same class.")
    print(table.to_string(index=False))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
