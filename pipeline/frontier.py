"""The sweep's points and its frontier (flows/sweep.py runs them): each point's configuration and
folder, every model timed together, the table, the plot, and the point select.max_drop picks."""
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd
import torch
from matplotlib.figure import Figure

from convheads import model_cost, vit_info
from convheads.engine.timing import INT8_RUNTIME, OnnxTimer, latency_stats, time_in_runtime
from convheads.precision import resolve_device

from .artifacts import stage_model
from .config import SWEEP_METHODS, PipelineConfig, validate
from .loaders import calibration_batches
from .problems import problem
from .runner import output_dir, read_record
from .summary import selection_summary

SHARED = ("data", "baseline", "score")           # computed once, read by every point
POINT_STAGES = ("select", "replace", "recover", "evaluate")
SWEEP_DIR, TABLE, PLOT = "sweep", "frontier.csv", "frontier.png"


def point_name(method: str, budget: float, seed: int) -> str:
    return f"{method}-{budget:.4g}-s{seed}"


def point_config(cfg: PipelineConfig, method: str, budget: float, seed: int) -> PipelineConfig:
    """The pipeline configuration of one point: its own outputs folder, its method and budget."""
    data = cfg.model_dump(mode="json")
    data["seed"] = seed
    data["paths"]["outputs"] = str(Path(cfg.paths.outputs) / SWEEP_DIR / "points" / point_name(method, budget, seed))
    s = data["select"]
    s.update(fraction=budget, count=None, blocks=None, max_drop=None)
    s["method"], granularity, replace = SWEEP_METHODS[method]
    s["granularity"] = granularity or s["granularity"]
    data["replace"].update(replace)
    if cfg.sweep.recover_epochs is not None:
        data["recover"]["epochs"] = cfg.sweep.recover_epochs
    return validate(data)


def link_shared(cfg: PipelineConfig, point: PipelineConfig) -> None:
    """The point's baseline and score folders are the shared ones (relative links)."""
    folder = Path(point.paths.outputs)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHARED[1:]:
        link = folder / name
        target = os.path.relpath(output_dir(cfg, name), folder)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)


def points(cfg: PipelineConfig) -> List[Tuple[str, float, int]]:
    sw = cfg.sweep
    return [(m, b, s) for m in sw.methods for b in sw.budgets for s in sw.seeds]


def benchmark_all(cfg: PipelineConfig, pts: Dict[str, PipelineConfig], workdir: Path) -> pd.DataFrame:
    """Every point's model and the baseline, timed interleaved in this process (headline runtime,
    every benchmark batch size): a row per model and batch size."""
    b = cfg.benchmark
    if b.threads:
        torch.set_num_threads(b.threads)
    device = resolve_device(cfg.device)
    runtime = cfg.benchmark_runtimes[0]
    models = {"baseline": stage_model(cfg, "baseline").to(device)}
    for name, point in pts.items():
        models[name] = stage_model(point, "recover").to(device)
    size = vit_info(models["baseline"]).img_size  # segmentation: segmentation.image_size
    rows = []
    calibration = (calibration_batches(cfg, models["baseline"])
                   if runtime == INT8_RUNTIME else None)
    with OnnxTimer() as onnx:
        for batch_size in b.batch_sizes:
            x = torch.randn(batch_size, 3, *size, device=device)
            for name, t in time_in_runtime(models, runtime, x, workdir, onnx, b.warmup, b.repeats,
                                           cfg.precision, calibration).items():
                rows.append({"model": name, "runtime": runtime, **latency_stats(t, batch_size)})
    table = pd.DataFrame(rows)
    costs = {name: model_cost(m) for name, m in models.items()}
    table["params"] = table.model.map(lambda n: costs[n].params)
    table["gmacs"] = table.model.map(lambda n: costs[n].gmacs)
    return table


def frontier(cfg: PipelineConfig, pts: Dict[str, PipelineConfig], timings: pd.DataFrame,
             trained: Dict[str, Dict]) -> pd.DataFrame:
    """A row per point: method, budget, seed, what was replaced, the task's headline metric (top1 or
    miou: before recovery, the baseline's, the drop), speed."""
    metric = problem(cfg).headline
    base = timings[timings.model == "baseline"].set_index("batch_size").infer_step_time
    rows = []
    for (method, budget, seed), name in ((p, point_name(*p)) for p in points(cfg)):
        point = pts[name]
        ev = read_record(point, "evaluate")["summary"]
        sel = selection_summary(point)
        mine = timings[timings.model == name].set_index("batch_size")
        rows.append({"method": method, "budget": budget, "seed": seed, "heads_replaced": sel["heads_replaced"],
                     "heads_total": sel["heads_total"], "whole_blocks": " ".join(map(str, sel["whole_blocks"])),
                     metric: ev["compressed"][metric], f"{metric}_before_recovery": ev["replaced"][metric],
                     f"baseline_{metric}": ev["baseline"][metric], f"{metric}_drop": ev[f"{metric}_drop"],
                     **{f"speedup_b{b}": base[b] / mine.infer_step_time[b] for b in cfg.benchmark.batch_sizes},
                     **{f"ms_b{b}": mine.infer_step_time[b] for b in cfg.benchmark.batch_sizes},
                     "params": int(mine.params.iloc[0]), "gmacs": float(mine.gmacs.iloc[0]),
                     "train_seconds": trained[name]["seconds"], "worker": trained[name]["worker"], "point": name})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, cfg: PipelineConfig, runtime: str, path: Path) -> None:
    """The headline metric (test top-1 or mIoU) vs measured speedup at the gate's batch size: a curve
    per method (mean over seeds, error bars one standard deviation when there are several), the
    baseline marked."""
    task = problem(cfg)
    metric = task.headline
    speed = f"speedup_b{cfg.gate_batch_size}"
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    for method, rows in table.groupby("method", sort=False):
        stats = rows.groupby("budget").agg(x=(speed, "mean"), xerr=(speed, "std"), y=(metric, "mean"),
                                           yerr=(metric, "std")).reset_index().fillna(0)
        ax.errorbar(stats.x, 100 * stats.y, xerr=stats.xerr, yerr=100 * stats.yerr, marker="o", capsize=3,
                    label=method)
        for _, r in stats.iterrows():
            ax.annotate(f"{r.budget:.2g}", (r.x, 100 * r.y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([1.0], [100 * table[f"baseline_{metric}"].iloc[0]], marker="*", s=200, color="black", zorder=5,
               label="baseline")
    seeds = table.seed.nunique()
    ax.set(xlabel=f"measured speedup vs the baseline, batch {cfg.gate_batch_size} ({runtime})",
           ylabel=f"test {task.label} (%)",
           title=f"accuracy vs speed ({seeds} seed{'s' if seeds > 1 else ''}{', mean +- sd' if seeds > 1 else ''};"
                 f" labels: budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def pick(table: pd.DataFrame, max_drop: float, metric: str) -> Optional[pd.Series]:
    """The largest budget whose mean drop of `metric` over seeds is within max_drop (ties: the
    higher mean); of its seeds, the most accurate point. None if no budget qualifies."""
    groups = table.groupby(["method", "budget"]).agg(drop=(f"{metric}_drop", "mean"),
                                                     quality=(metric, "mean")).reset_index()
    ok = groups[groups["drop"] <= max_drop + 1e-12]
    if ok.empty:
        return None
    best = ok.sort_values(["budget", "quality"], ascending=False).iloc[0]
    rows = table[(table.method == best.method) & (table.budget == best.budget)]
    return rows.sort_values(metric, ascending=False).iloc[0]
