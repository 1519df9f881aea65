"""The speed benchmark suite: every number the speed claims rest on, in one run.

    python -m benchmarks.suite            # all sections, paper settings: tens of minutes on 2 CPU cores
    python -m benchmarks.suite --quick    # smoke run: a small model, few repeats, no torch.compile
    python -m benchmarks.suite --sections latency sweep --settings vit_base_patch14_dinov2:518:6
    python -m benchmarks.suite --sections latency --settings digits:32:3 --variants original depthwise depthwise_global
    python -m benchmarks.suite --sections layers --layer-grids 4 8 --layer-batches 1

Sections (the sweep, modes and onnx sections use the first setting):
  layers   one attention layer vs its replacement across grid sizes, widths, prefix tokens and
           batch sizes, eager / torch.compile / onnxruntime (+ a heat map of the ratio)
  latency  original / depthwise / depthwise_global / identity / ensemble variants of each setting, per batch size
  sweep    speedup against the number of replaced blocks 0 .. depth, beside the analytic MACs ratio (+ plot)
  modes    eager vs channels_last vs torch.compile, for the original and the depthwise variant
  onnx     ONNX export (checked in onnxruntime) and PyTorch, each runtime timed in its own process
  int8     original / depthwise / identity / folded in onnxruntime, float32 beside static INT8 (QDQ), batch 1
  scoring  head-scoring throughput and peak memory for 100 and 1,000 images, each in a fresh process

Models have random weights (speed does not depend on them). All models of a table are timed
interleaved in one process after warm-up; the thread count is fixed and recorded in every row.
Results: a table per section on the terminal, and results/suite_<section>.csv with its stamp
(benchmarks/results.py; sweep.png and layers.png beside them), which the docs' speed page shows.
A --quick run writes to results/quick/ instead, which is not tracked: it is a smoke run, not a measurement.
"""
import argparse
import sys
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

from .results import RESULTS, write_results

SECTIONS = ("layers", "latency", "sweep", "modes", "onnx", "int8", "scoring")
PAPER_SETTINGS = ["vit_large_patch14_dinov2:336:12", "vit_base_patch14_dinov2:518:6", "vit_small_patch16_224:224:6"]
FULL = dict(settings=PAPER_SETTINGS, batch_sizes=[1, 8], repeats=7, warmup=2, sweep_repeats=5,
            scoring_model="vit_small_patch16_224:224", scoring_images=[100, 1000], modes=list(MODES),
            layer_grids=list(layer_speed.GRIDS), layer_widths=list(layer_speed.HEADS),
            layer_prefixes=list(layer_speed.PREFIXES), layer_batches=list(layer_speed.BATCHES),
            layer_runtimes=list(layer_speed.RUNTIMES), layer_budget=1.0, layer_variants=["depthwise"],
            layer_depth=layer_speed.DEPTH)
QUICK = dict(settings=["vit_tiny_patch16_224:224:6"], batch_sizes=[1, 2], repeats=3, warmup=1, sweep_repeats=3,
             scoring_model="vit_tiny_patch16_224:112", scoring_images=[20, 100], modes=["eager", "channels_last"],
             layer_grids=[4, 8], layer_widths=[128], layer_prefixes=[0, 1], layer_batches=[1],
             layer_runtimes=["eager", "onnxruntime"], layer_budget=0.05, layer_variants=["depthwise"],
             layer_depth=2)
PROGRESS = sys.stderr.isatty()  # progress bars only where someone watches
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHOWN = {  # column -> format, for the terminal tables
    "model": "{}", "img_size": "{}", "blocks": "{}", "batch_size": "{}", "variant": "{}", "mode": "{}",
    "runtime": "{}", "num_images": "{}", "infer_step_time": "{:.1f}", "infer_step_time_p90": "{:.1f}",
    "infer_samples_per_sec": "{:.2f}", "speedup": "{:.3f}", "speedup_vs_original": "{:.3f}",
    "speedup_lo": "{:.3f}", "speedup_hi": "{:.3f}", "vs_identity": "{:.3f}", "vs_identity_lo": "{:.3f}",
    "vs_identity_hi": "{:.3f}",
    "speedup_vs_eager": "{:.3f}", "speedup_vs_pytorch": "{:.3f}", "original_ms": "{:.1f}", "replaced_ms": "{:.1f}",
    "macs_ratio": "{:.3f}", "gmacs": "{:.1f}", "max_abs_diff": "{:.1e}", "onnx_max_abs_diff": "{:.1e}",
    "first_call_s": "{:.1f}", "images_per_s": "{:.2f}", "peak_growth_mb": "{:.0f}", "peak_rss_mb": "{:.0f}",
    "int8_vs_fp32": "{:.3f}", "quantization": "{}",
    "grid": "{}", "width": "{}", "prefix": "{}", "batch": "{}", "mixing": "{}", "original_us": "{:.0f}",
    "replaced_us": "{:.0f}", "ratio": "{:.3f}", "ratio_best": "{:.3f}", "rounds": "{}",
}


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
    p.add_argument("--out", type=Path, help="where the tables go (default results/, --quick: results/quick/)")
    p.epilog = "defaults: " + str(FULL)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
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


TITLES = {
    "layers": "One attention layer against its replacement (ratio = replaced / original latency)",
    "latency": "Latency of each variant, per setting and batch size",
    "sweep": "Speedup against the number of replaced blocks, beside the analytic MACs ratio",
    "modes": "Eager, channels_last and torch.compile",
    "onnx": "onnxruntime beside PyTorch, each timed in a process of its own",
    "int8": "INT8 in onnxruntime (static QDQ) beside float32: the replacement's gain after quantization",
    "scoring": "The head-scoring pass: throughput and peak memory",
}


def write(out: Path, name: str, rows: List[dict], how: str = "") -> pd.DataFrame:
    """results/suite_<name>.csv and its stamp (under `out`), atomically."""
    table = pd.DataFrame(rows)
    write_results(f"suite_{name}", table, title=TITLES[name], page="speed", root=out,
                  columns=[c for c in SHOWN if c in table], notes=how)
    return table


def section(out: Path, name: str, rows: List[dict], how: str = "") -> pd.DataFrame:
    show(rows)
    return write(out, name, rows, how)


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
    torch.set_num_threads(args.threads)
    device, dtype, first = args.device, args.dtype, settings[0]
    how = (f"Timed on {device} in {str(dtype).replace('torch.', '')} with {torch.get_num_threads()} threads, torch "
           f"{torch.__version__}. Times in ms (median and 90th percentile over the rounds) unless the column says us; "
           f"a speedup is over the original model.")
    print(f"{how} Results in {args.out}")
    tables = {}
    if "layers" in args.sections:
        print(f"\n== layers: {len(args.layer_points)} points x {args.layer_runtimes}, chains of {args.layer_depth} "
              f"layers (times per layer), ~{args.layer_budget:g} s of rounds per pair", flush=True)
        rows = layer_speed.layer_speed(args.layer_points, args.layer_runtimes, args.layer_budget, device=device,
                                       dtype=dtype, progress=PROGRESS)
        tables["layers"] = section(args.out, "layers", rows, how)
        layer_speed.plot_layers(rows, args.out / "layers.png")
    if "latency" in args.sections:
        rows = []
        for s in settings:
            print(f"\n== latency: {s} (batch sizes {args.batch_sizes}, {args.repeats} interleaved rounds)", flush=True)
            new = benchmark_setting(s, args.batch_sizes, args.variants, args.repeats, args.warmup, device, dtype,
                                    progress=PROGRESS)
            show(new)
            rows += new
            tables["latency"] = write(args.out, "latency", rows, how)  # after each setting: a crash keeps the rest
    if "sweep" in args.sections:
        print(f"\n== sweep: {first.model} {first.img_size}px, blocks 0..depth, batch 1", flush=True)
        tables["sweep"] = section(args.out, "sweep", sweep_blocks(
            first.model, first.img_size, 1, "depthwise", args.sweep_repeats, 1, device, dtype, progress=PROGRESS), how)
        plot_sweep(tables["sweep"], args.out / "sweep.png")
    if "modes" in args.sections:
        print(f"\n== modes: {first}, batch 1, {args.modes}", flush=True)
        tables["modes"] = section(args.out, "modes", compare_modes(
            first, 1, ("original", "depthwise"), args.modes, args.repeats, args.warmup, device, dtype,
            progress=PROGRESS), how)
    if "onnx" in args.sections:
        print(f"\n== onnx: {first}, batch 1, CPU float32", flush=True)
        tables["onnx"] = section(args.out, "onnx", compare_onnx(
            first, 1, args.variants, args.repeats, args.warmup, progress=PROGRESS), how)
    if "int8" in args.sections:
        print(f"\n== int8: {first}, batch 1, onnxruntime float32 and INT8", flush=True)
        tables["int8"] = section(args.out, "int8", compare_int8(first, 1, repeats=args.repeats, warmup=args.warmup),
                                 how + " _lo and _hi: 95% bootstrap interval over the rounds, which are paired "
                                 "within a runtime; vs_identity: latency over identity's.")
    if "scoring" in args.sections:
        model, size = args.scoring_model.rsplit(":", 1)
        print(f"\n== scoring: {model} {size}px, {args.scoring_images} images, batch 8, fresh process each", flush=True)
        tables["scoring"] = section(args.out, "scoring", scoring_memory(model, int(size), args.scoring_images, 8,
                                                                      args.threads), how)
    return tables


def main() -> None:
    try:
        run(parse_args())
    except ConvHeadsError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
