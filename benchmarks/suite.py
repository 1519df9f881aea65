"""The speed benchmark suite: every number the speed claims rest on, in one run.

    python -m benchmarks.suite            # all sections, paper settings: tens of minutes on 2 CPU cores
    python -m benchmarks.suite --quick    # smoke run: a small model, few repeats, no torch.compile
    python -m benchmarks.suite --sections latency sweep --settings vit_base_patch14_dinov2:518:6
    python -m benchmarks.suite --sections latency --settings digits:32:3 --variants original depthwise depthwise_global
    python -m benchmarks.suite --sections layers --layer-grids 4 8 --layer-batches 1

Sections (the sweep, modes, onnx and int8 sections use the first setting):
  layers   one attention layer vs its replacement across grid sizes, widths, prefix tokens and
           batch sizes, eager / torch.compile / onnxruntime (+ a heat map of the ratio)
  latency  original / depthwise / depthwise_global / identity / ensemble variants of each setting, per batch size
  sweep    speedup against the number of replaced blocks 0 .. depth, beside the analytic MACs ratio (+ plot)
  modes    eager vs channels_last vs torch.compile, for the original and the depthwise variant
  onnx     ONNX export (checked in onnxruntime) and PyTorch, each runtime timed in its own process
  int8     float32 and INT8 (static QDQ, convheads.quantize) exports of each variant in onnxruntime
  scoring  head-scoring throughput and peak memory for 100 and 1,000 images, each in a fresh process

Models have random weights (speed does not depend on them). All models of a table are timed
interleaved in one process after warm-up; the thread count is fixed and recorded in every row.
Results: a table per section on the terminal, and <out>/<section>.csv and .json (+ sweep.png); every
row is stamped with the commit, date, CPU, core count and command line that measured it.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pandas as pd
import torch

from benchmarks import layer_speed
from benchmarks.measure import (
    MODES,
    VARIANTS,
    Setting,
    benchmark_setting,
    compare_int8,
    compare_modes,
    compare_onnx,
    scoring_memory,
    sweep_blocks,
)
from convheads import ConvHeadsError
from convheads.engine.timing import check_repeats
from convheads.files import atomic_path

SECTIONS = ("layers", "latency", "sweep", "modes", "onnx", "int8", "scoring")
PAPER_SETTINGS = ["vit_large_patch14_dinov2:336:12", "vit_base_patch14_dinov2:518:6", "vit_small_patch16_224:224:6"]
FULL = dict(settings=PAPER_SETTINGS, batch_sizes=[1, 8], repeats=7, warmup=2, sweep_repeats=5, calibration_images=8,
            scoring_model="vit_small_patch16_224:224", scoring_images=[100, 1000], modes=list(MODES),
            layer_grids=list(layer_speed.GRIDS), layer_widths=list(layer_speed.HEADS),
            layer_prefixes=list(layer_speed.PREFIXES), layer_batches=list(layer_speed.BATCHES),
            layer_runtimes=list(layer_speed.RUNTIMES), layer_budget=1.0, layer_variants=["depthwise"],
            layer_depth=layer_speed.DEPTH)
QUICK = dict(settings=["vit_tiny_patch16_224:224:6"], batch_sizes=[1, 2], repeats=3, warmup=1, sweep_repeats=3,
             calibration_images=2,
             scoring_model="vit_tiny_patch16_224:112", scoring_images=[20, 100], modes=["eager", "channels_last"],
             layer_grids=[4, 8], layer_widths=[128], layer_prefixes=[0, 1], layer_batches=[1],
             layer_runtimes=["eager", "onnxruntime"], layer_budget=0.05, layer_variants=["depthwise"],
             layer_depth=2)
PROJECT = Path(__file__).resolve().parent.parent
PROGRESS = sys.stderr.isatty()  # progress bars only where someone watches
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHOWN = {  # column -> format, for the terminal tables
    "model": "{}", "img_size": "{}", "blocks": "{}", "batch_size": "{}", "variant": "{}", "mode": "{}",
    "runtime": "{}", "num_images": "{}", "infer_step_time": "{:.1f}", "infer_step_time_p90": "{:.1f}",
    "infer_samples_per_sec": "{:.2f}", "speedup": "{:.3f}", "speedup_vs_original": "{:.3f}",
    "speedup_vs_eager": "{:.3f}", "speedup_vs_pytorch": "{:.3f}", "original_ms": "{:.1f}", "replaced_ms": "{:.1f}",
    "macs_ratio": "{:.3f}", "gmacs": "{:.1f}", "max_abs_diff": "{:.1e}", "onnx_max_abs_diff": "{:.1e}",
    "first_call_s": "{:.1f}", "images_per_s": "{:.2f}", "peak_growth_mb": "{:.0f}", "peak_rss_mb": "{:.0f}",
    "grid": "{}", "width": "{}", "prefix": "{}", "batch": "{}", "mixing": "{}", "original_us": "{:.0f}",
    "replaced_us": "{:.0f}", "ratio": "{:.3f}", "ratio_best": "{:.3f}", "rounds": "{}", "precision": "{}",
    "method": "{}", "speedup_vs_fp32": "{:.3f}", "int8_rel_diff": "{:.1e}",
}
INT8_VARIANTS = ["original", "depthwise", "identity", "folded"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run; its defaults: " + str(QUICK))
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--settings", nargs="+", metavar="MODEL:IMG_SIZE:BLOCKS", help="models to time")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--batch-sizes", nargs="+", type=int)
    p.add_argument("--repeats", type=int, help="timed rounds per table (median, p90 over them)")
    p.add_argument("--warmup", type=int, help="untimed rounds first")
    p.add_argument("--sweep-repeats", type=int, help="timed rounds per step of the sweep")
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--int8-variants", nargs="+", choices=VARIANTS, help="int8: the variants quantized "
                   "(default: original, depthwise, identity, folded)")
    p.add_argument("--calibration-images", type=int, help="int8: random images static quantization calibrates on")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (fixed)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, float16 on GPU")
    p.add_argument("--scoring-model", metavar="MODEL:IMG_SIZE")
    p.add_argument("--scoring-images", nargs="+", type=int)
    p.add_argument("--layer-grids", nargs="+", type=int, metavar="G", help="layers: g x g patch grids")
    p.add_argument("--layer-widths", nargs="+", type=int, metavar="C", help="layers: widths " + str(
        layer_speed.HEADS) + " (width: heads; other multiples of 64 get width / 64 heads)")
    p.add_argument("--layer-prefixes", nargs="+", type=int, metavar="P", help="layers: prefix tokens")
    p.add_argument("--layer-batches", nargs="+", type=int, metavar="B", help="layers: batch sizes")
    p.add_argument("--layer-runtimes", nargs="+", choices=layer_speed.RUNTIMES)
    p.add_argument("--layer-budget", type=float, metavar="S", help="layers: seconds of timed rounds per pair")
    p.add_argument("--layer-variants", nargs="+", choices=layer_speed.LAYER_VARIANTS, help="layers: replacements")
    p.add_argument("--layer-depth", type=int, metavar="L", help="layers: distinct layers chained per timed call "
                   "(times are per layer; a chain evicts each layer's weights from the cache, as a model does)")
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.epilog = "defaults: " + str(FULL)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for key, value in (QUICK if args.quick else FULL).items():  # what the command line leaves unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> List[Setting]:
    """Every argument checked before anything heavy runs."""
    check_repeats(args.repeats, args.warmup)
    check_repeats(args.sweep_repeats, 0)
    if args.threads < 1 or any(b < 1 for b in args.batch_sizes) or any(n < 2 for n in args.scoring_images):
        raise ConvHeadsError("--threads and --batch-sizes must be >= 1 and --scoring-images >= 2")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvHeadsError("--device cuda but no GPU is visible; use --device cpu")
    args.dtype = DTYPES[args.dtype or ("float16" if args.device.startswith("cuda") else "float32")]
    args.layer_points = layer_speed.points(args.layer_grids, args.layer_widths, args.layer_prefixes, args.layer_batches,
                                           args.layer_variants, args.layer_depth)
    if args.calibration_images < 1:
        raise ConvHeadsError("--calibration-images must be >= 1")
    if args.int8_variants is None:
        args.int8_variants = [v for v in INT8_VARIANTS if v in args.variants or v == "original"]
    if args.layer_budget <= 0:
        raise ConvHeadsError("--layer-budget must be positive (seconds)")
    settings = [Setting.parse(s) for s in args.settings]
    scoring = args.scoring_model.rsplit(":", 1)
    if len(scoring) != 2 or not scoring[1].isdigit():
        raise ConvHeadsError(f"--scoring-model is MODEL:IMG_SIZE; got {args.scoring_model!r}")
    for s in settings + [Setting(scoring[0], int(scoring[1]), 0)]:
        s.check()
    return settings


def show(rows: List[dict]) -> None:
    table = pd.DataFrame(rows)
    table = table[[c for c in SHOWN if c in table]]
    print(table.to_string(index=False, formatters={c: SHOWN[c].format for c in table}, na_rep="-"), flush=True)


def stamp(argv: List[str]) -> dict:
    """What a result row needs to stand on its own: the commit, date, machine and command line."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "convheads", "benchmarks"],
                               cwd=PROJECT, capture_output=True, text=True, check=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_model(),
            "cores": os.cpu_count(), "command": " ".join(["python -m benchmarks.suite", *argv])}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(out: Path, mark: dict, name: str, rows: List[dict]) -> pd.DataFrame:
    """<out>/<name>.csv and .json, atomically, every row stamped with `mark` (see `stamp`)."""
    rows = [{**r, **mark} for r in rows]
    table = pd.DataFrame(rows)
    with atomic_path(out / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1, default=str))
    return table


def section(out: Path, mark: dict, name: str, rows: List[dict]) -> pd.DataFrame:
    show(rows)
    return write(out, mark, name, rows)


def plot_sweep(table: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = table.iloc[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(table.blocks, table.speedup, "o-", label="measured latency ratio")
    ax.plot(table.blocks, table.macs_ratio, "s--", label="analytic MACs ratio")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel=f"blocks replaced ({r.variant}, all heads)", ylabel="speedup over the original",
           title=f"{r.model} {r.img_size}px, batch {r.batch_size}, {r.threads} threads")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> Dict[str, pd.DataFrame]:
    """Run the chosen sections; return their tables (also written under args.out)."""
    settings = check_args(args)
    mark = stamp(args.argv)  # the code as it was when the run started
    torch.set_num_threads(args.threads)
    device, dtype, first = args.device, args.dtype, settings[0]
    meta = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv, threads=torch.get_num_threads(),
                device=device, dtype=str(dtype), torch=torch.__version__,
                cpu=cpu_model(), cores=os.cpu_count(),
                python=platform.python_version(), settings=[str(s) for s in settings])
    with atomic_path(args.out / "run.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    print(f"threads {meta['threads']}, {device}, {meta['dtype']}, torch {torch.__version__}; results in {args.out}")
    tables = {}
    if "layers" in args.sections:
        print(f"\n== layers: {len(args.layer_points)} points x {args.layer_runtimes}, chains of {args.layer_depth} "
              f"layers (times per layer), ~{args.layer_budget:g} s of rounds per pair", flush=True)
        rows = layer_speed.layer_speed(args.layer_points, args.layer_runtimes, args.layer_budget, device=device,
                                       dtype=dtype, progress=PROGRESS)
        tables["layers"] = section(args.out, mark, "layers", rows)
        layer_speed.plot_layers(rows, args.out / "layers.png")
    if "latency" in args.sections:
        rows = []
        for s in settings:
            print(f"\n== latency: {s} (batch sizes {args.batch_sizes}, {args.repeats} interleaved rounds)", flush=True)
            new = benchmark_setting(s, args.batch_sizes, args.variants, args.repeats, args.warmup, device, dtype,
                                    progress=PROGRESS)
            show(new)
            rows += new
            tables["latency"] = write(args.out, mark, "latency", rows)  # after each setting: a crash keeps the rest
    if "sweep" in args.sections:
        print(f"\n== sweep: {first.model} {first.img_size}px, blocks 0..depth, batch 1", flush=True)
        tables["sweep"] = section(args.out, mark, "sweep", sweep_blocks(
            first.model, first.img_size, 1, "depthwise", args.sweep_repeats, 1, device, dtype, progress=PROGRESS))
        plot_sweep(tables["sweep"], args.out / "sweep.png")
    if "modes" in args.sections:
        print(f"\n== modes: {first}, batch 1, {args.modes}", flush=True)
        tables["modes"] = section(args.out, mark, "modes", compare_modes(
            first, 1, ("original", "depthwise"), args.modes, args.repeats, args.warmup, device, dtype,
            progress=PROGRESS))
    if "onnx" in args.sections:
        print(f"\n== onnx: {first}, batch 1, CPU float32", flush=True)
        tables["onnx"] = section(args.out, mark, "onnx", compare_onnx(
            first, 1, args.variants, args.repeats, args.warmup, progress=PROGRESS))
    if "int8" in args.sections:
        print(f"\n== int8: {first}, batch 1, onnxruntime float32 vs INT8 ({args.calibration_images} calibration "
              f"images), {args.int8_variants}", flush=True)
        tables["int8"] = section(args.out, mark, "int8", compare_int8(
            first, 1, args.int8_variants, args.repeats, args.warmup, args.calibration_images, progress=PROGRESS))
    if "scoring" in args.sections:
        model, size = args.scoring_model.rsplit(":", 1)
        print(f"\n== scoring: {model} {size}px, {args.scoring_images} images, batch 8, fresh process each", flush=True)
        tables["scoring"] = section(args.out, mark, "scoring", scoring_memory(model, int(size), args.scoring_images, 8,
                                                                      args.threads))
    return tables


def main() -> None:
    try:
        run(parse_args())
    except ConvHeadsError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
