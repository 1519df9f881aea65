"""Fine-tuning speed and memory, measured as a user runs the pipeline.

    python -m benchmarks.train_speed throughput   # images/s of a recovery epoch: fp32 vs bf16, 1 vs 2 processes
    python -m benchmarks.train_speed memory       # peak memory of ViT-L/14 @ 336 fine-tuning, per image,
                                                  # with and without gradient checkpointing

throughput: for each model (the default digits ViT; ViT-S/16 at 224 on the digits resized, on a
10% training split so that an epoch takes a minute on 2 CPU cores), the pipeline is run up to
`replace` in a temporary folder (baseline with 0 epochs: speed does not depend on the weights), then
`python -m pipeline run recover --force` once per (precision, processes), and the epoch's
train_images_per_sec (the training loop alone, all processes together) is read from history.csv.
memory: forward and backward of a randomly initialised vit_large_patch14_dinov2 at 336 px in a
fresh process per (batch size, checkpointing); step_mb = the peak resident memory above the
weights (gradients + activations kept for the backward pass); per image = step_mb(batch 4) -
step_mb(batch 1), over 3, the activations of one more image. (Measured on the RSS: a process's allocator
keeps freed memory, so one pass per process.)
Results go to the terminal and to results/train_throughput.csv and results/train_memory.csv with
their stamps (benchmarks/results.py), which the docs' training page shows.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from convheads.data.loaders import cpu_cores

from .results import PROJECT, RESULTS, write_results

MODELS = {
    "digits ViT (default)": {},
    "ViT-S/16 @ 224": {"model": {"name": "vit_small_patch16_224", "kwargs": {"img_size": 224}},
                       "data": {"val_fraction": 0.05, "test_fraction": 0.85}},
}


def _run(args, cwd=PROJECT, threads=None) -> str:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


# (processes, threads per process): 1 process with torch's default (a thread per core) and with 1
# thread, 2 processes with the launcher's default (an equal share of the cores each).
LAYOUTS = ((1, None), (1, 1), (2, None))


def throughput(layouts=LAYOUTS, precisions=("fp32", "bf16")) -> pd.DataFrame:
    rows = []
    for label, changes in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            params = yaml.safe_load((PROJECT / "params.yaml").read_text())
            params["paths"] = {"data": f"{tmp}/data", "outputs": f"{tmp}/outputs"}
            params["baseline"]["epochs"] = 0
            params["score"]["max_images"] = 16
            params["recover"]["epochs"] = 1
            for section, values in changes.items():
                params[section].update(values)
            (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
            base = ["--params", f"{tmp}/params.yaml", "device=cpu"]
            for stage in ("data", "baseline", "score", "select", "replace"):
                _run(["-m", "pipeline", "run", stage, *base])
            for precision in precisions:
                for n, threads in layouts:
                    _run(["-m", "pipeline", "run", "recover", "--force", *base, f"precision={precision}",
                          f"distributed.nproc_per_node={n}"], threads=threads)
                    history = pd.read_csv(Path(tmp) / "outputs/recover/history.csv")
                    row = {"model": label, "precision": precision, "processes": n,
                           "threads_per_process": threads or max(1, cpu_cores() // n),
                           "images": int(round(history.train_images_per_sec[0] * history.train_seconds[0])),
                           "seconds": history.train_seconds[0], "images_per_sec": history.train_images_per_sec[0],
                           "loadavg": os.getloadavg()[0]}
                    print(row, flush=True)
                    rows.append(row)
    return pd.DataFrame(rows)


def memory_one(batch_size: int, checkpointing: bool) -> dict:
    """Forward and backward of ViT-L/14 @ 336 in this (fresh) process: resident memory (MiB)
    before and at the peak. The peak holds the weights, their gradients and the activations kept
    for the backward pass; AdamW's state (2 x the weights) comes on top in training."""
    import torch
    import torch.nn.functional as F

    from convheads import create_model
    from convheads.engine.timing import PeakMemory

    torch.manual_seed(0)
    model = create_model("vit_large_patch14_dinov2", img_size=336, num_classes=1000)
    model.set_grad_checkpointing(checkpointing)
    model.train()
    x, y = torch.randn(batch_size, 3, 336, 336), torch.randint(0, 1000, (batch_size,))
    with PeakMemory() as peak:
        F.cross_entropy(model(x), y).backward()
    return {"batch_size": batch_size, "checkpointing": checkpointing, "before_mb": peak.before_mb,
            "peak_mb": peak.peak_mb, "step_mb": peak.peak_mb - peak.before_mb}


BATCHES = (1, 4)  # a difference of 3 images stands above the sampling noise of a busy machine


def memory() -> pd.DataFrame:
    rows = [json.loads(_run(["-m", "benchmarks.train_speed", "memory-one", str(b)] + (["--checkpointing"] if c else []))
                       .strip().splitlines()[-1]) for c in (False, True) for b in BATCHES]
    table = pd.DataFrame(rows)
    step = table.pivot(index="checkpointing", columns="batch_size", values="step_mb")
    table["per_image_mb"] = table.checkpointing.map((step[BATCHES[1]] - step[BATCHES[0]]) / (BATCHES[1] - BATCHES[0]))
    table["loadavg"] = os.getloadavg()[0]
    return table


STAMPS = {
    "throughput": dict(
        title="Training throughput of a recovery epoch: precision x processes",
        notes="train_images_per_sec of one recovery epoch (half the blocks replaced) as `python -m pipeline run "
              "recover` runs it: the training loop of all processes together, validation excluded. `loadavg` is "
              "the machine's load when the row was measured: compare rows measured at similar load."),
    "memory": dict(
        title="Memory of a ViT-L/14 training step at 336 px, with and without gradient checkpointing",
        notes="Forward and backward of a randomly initialised vit_large_patch14_dinov2 in fp32 on the CPU, each in "
              "a fresh process. step_mb: the peak resident memory above the weights (gradients and the "
              "activations kept for the backward pass); per_image_mb: the difference between the two batch "
              "sizes, per image. AdamW's state (twice the weights) comes on top in training."),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["throughput", "memory", "memory-one"])
    p.add_argument("batch_size", nargs="?", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true")
    args = p.parse_args(argv)
    if args.what == "memory-one":
        print(json.dumps(memory_one(args.batch_size, args.checkpointing)))
        return 0
    table = throughput() if args.what == "throughput" else memory()
    print(table.to_string(index=False))
    write_results(f"train_{args.what}", table, page="training", root=RESULTS, **STAMPS[args.what])
    return 0


if __name__ == "__main__":
    sys.exit(main())
