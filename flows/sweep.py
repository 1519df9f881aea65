"""The accuracy-vs-speed frontier: which rule, and how many heads, for this model and data.

    python -m flows.sweep                                    # params.yaml's sweep: section
    python -m flows.sweep sweep.budgets=[0.25,0.5] sweep.methods=[sigma_h,random] sweep.seeds=[0,1,2]
    python -m flows.sweep sweep.task_runner=dask sweep.address=tcp://scheduler:8786

One shared baseline and one shared score file (the pipeline's own stages, in paths.outputs); then
for every (method, budget, seed) a point: select + replace + recover + evaluate in its own folder,
outputs/sweep/points/<method>-<budget>-s<seed>/, as a Prefect task on the configured task runner
(local: one after another; dask: on the cluster's workers). When every point has trained, every
model is timed in this process, interleaved with the baseline (never while others train). Writes
outputs/sweep/frontier.csv (a row per point) and frontier.png (accuracy vs measured speedup, a curve
per method, error bars over seeds), also to one MLflow run. With select.max_drop set, the largest
budget whose mean top-1 drop stays within it is benchmarked as a pipeline run of its own and
handed to the registry gate.
"""
import contextlib
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import mlflow
import pandas as pd
import torch
from matplotlib.figure import Figure
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import checked_config, exit_status, parse_command_line, prefect_api
from benchmarks.timing import OnnxTimer, latency_stats
from convheads import ConvHeadsError, model_cost
from convheads.precision import resolve_device
from tasks import preflight
from tasks.benchmark import time_runtime
from tasks.config import PipelineConfig, validate
from tasks.inputs import stage_model
from tasks.lock import hold
from tasks.pipeline import STAGES
from tasks.registry import register
from tasks.runner import execute, output_dir, read_record
from tasks.tracking import check_reachable, log_stage, pipeline_run

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
    s["method"] = {"sigma_h": "sigma", "sigma_b": "sigma", "drop": "sigma"}.get(method, method)
    if method in ("sigma_h", "sigma_b"):
        s["granularity"] = "head" if method == "sigma_h" else "block"
    if method == "drop":
        data["replace"]["variant"] = "drop"
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


@task(cache_policy=NONE)
def train_point(point: PipelineConfig) -> Dict:
    """select + replace + recover + evaluate of one point (each skipped when up to date)."""
    started = time.perf_counter()
    if multiprocessing.current_process().daemon:  # a Dask worker: it may not start DataLoader workers
        point = point.model_copy(update={"loader": point.loader.model_copy(update={"num_workers": 0})})
    skipped = [execute(STAGES[name], point).skipped for name in POINT_STAGES]
    return {"seconds": time.perf_counter() - started, "skipped": all(skipped)}


def check_cluster(address: str, timeout: float = 5.0) -> None:
    """A Dask scheduler that does not answer fails the sweep in seconds, naming it."""
    url = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = url.hostname, url.port or 8786
        socket.create_connection((host, port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ConvHeadsError(f"the Dask scheduler at {address} (sweep.address) is not reachable ({reason}); start "
                             f"it (dask scheduler) or fix the address, or use sweep.task_runner=local") from None


def task_runner(cfg: PipelineConfig):
    if cfg.sweep.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        check_cluster(cfg.sweep.address)
        return DaskTaskRunner(address=cfg.sweep.address)
    return ThreadPoolTaskRunner(max_workers=1)  # the points train one after another: each uses every core


def points(cfg: PipelineConfig) -> List[Tuple[str, float, int]]:
    sw = cfg.sweep
    return [(m, b, s) for m in sw.methods for b in sw.budgets for s in sw.seeds]


def check(cfg: PipelineConfig) -> None:
    """Bad input fails here, before any training: every point's configuration and budget."""
    if cfg.task != "classification":  # its table and plot are in top-1
        raise ConvHeadsError(f"the sweep measures classification (top-1) so far, not task={cfg.task}: run "
                             "python -m flows.compress task=segmentation select.fraction=... per budget")
    preflight.check(cfg)
    for method, budget, seed in points(cfg):
        try:
            point_config(cfg, method, budget, seed)
        except ConvHeadsError as e:
            raise ConvHeadsError(f"sweep point {point_name(method, budget, seed)}: {e}") from None
    if cfg.sweep.task_runner == "dask":
        check_cluster(cfg.sweep.address)


def benchmark_all(cfg: PipelineConfig, pts: Dict[str, PipelineConfig], workdir: Path) -> pd.DataFrame:
    """Every point's model and the baseline, timed interleaved in this process (headline runtime,
    every benchmark batch size): a row per model and batch size."""
    b = cfg.benchmark
    if b.threads:
        torch.set_num_threads(b.threads)
    device = resolve_device(cfg.device)
    runtime = next((r for r in b.runtimes if r != "onnxruntime" or device == "cpu"), "eager")
    models = {"baseline": stage_model(cfg, "baseline").to(device)}
    for name, point in pts.items():
        models[name] = stage_model(point, "recover").to(device)
    size = models["baseline"].patch_embed.img_size
    rows = []
    with OnnxTimer() as onnx:
        for batch_size in b.batch_sizes:
            x = torch.randn(batch_size, 3, *size, device=device)
            for name, t in time_runtime(models, runtime, x, cfg, workdir, onnx).items():
                rows.append({"model": name, "runtime": runtime, **latency_stats(t, batch_size)})
    table = pd.DataFrame(rows)
    costs = {name: model_cost(m) for name, m in models.items()}
    table["params"] = table.model.map(lambda n: costs[n].params)
    table["gmacs"] = table.model.map(lambda n: costs[n].gmacs)
    return table


def frontier(cfg: PipelineConfig, pts: Dict[str, PipelineConfig], timings: pd.DataFrame,
             trained: Dict[str, Dict]) -> pd.DataFrame:
    """A row per point: method, budget, seed, what was replaced, accuracy, speed."""
    base = timings[timings.model == "baseline"].set_index("batch_size").infer_step_time
    rows = []
    for (method, budget, seed), name in ((p, point_name(*p)) for p in points(cfg)):
        point = pts[name]
        ev = read_record(point, "evaluate")["summary"]
        sel = {**read_record(point, "select")["summary"], **read_record(point, "recover")["summary"].get("dsp", {})}
        mine = timings[timings.model == name].set_index("batch_size")
        rows.append({"method": method, "budget": budget, "seed": seed, "heads_replaced": sel["heads_replaced"],
                     "heads_total": sel["heads_total"], "whole_blocks": " ".join(map(str, sel["whole_blocks"])),
                     "top1": ev["compressed"]["top1"], "top1_before_recovery": ev["replaced"]["top1"],
                     "baseline_top1": ev["baseline"]["top1"], "top1_drop": ev["top1_drop"],
                     **{f"speedup_b{b}": base[b] / mine.infer_step_time[b] for b in cfg.benchmark.batch_sizes},
                     **{f"ms_b{b}": mine.infer_step_time[b] for b in cfg.benchmark.batch_sizes},
                     "params": int(mine.params.iloc[0]), "gmacs": float(mine.gmacs.iloc[0]),
                     "train_seconds": trained[name]["seconds"], "point": name})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, cfg: PipelineConfig, runtime: str, path: Path) -> None:
    """Test top-1 vs measured speedup at the gate's batch size: a curve per method (mean over seeds,
    error bars one standard deviation when there are several), the baseline marked."""
    speed = f"speedup_b{cfg.gate_batch_size}"
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    for method, rows in table.groupby("method", sort=False):
        stats = rows.groupby("budget").agg(x=(speed, "mean"), xerr=(speed, "std"), y=("top1", "mean"),
                                           yerr=("top1", "std")).reset_index().fillna(0)
        ax.errorbar(stats.x, 100 * stats.y, xerr=stats.xerr, yerr=100 * stats.yerr, marker="o", capsize=3,
                    label=method)
        for _, r in stats.iterrows():
            ax.annotate(f"{r.budget:.2g}", (r.x, 100 * r.y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([1.0], [100 * table.baseline_top1.iloc[0]], marker="*", s=200, color="black", zorder=5,
               label="baseline")
    seeds = table.seed.nunique()
    ax.set(xlabel=f"measured speedup vs the baseline, batch {cfg.gate_batch_size} ({runtime})",
           ylabel="test top-1 (%)",
           title=f"accuracy vs speed ({seeds} seed{'s' if seeds > 1 else ''}{', mean +- sd' if seeds > 1 else ''};"
                 f" labels: budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def pick(table: pd.DataFrame, max_drop: float) -> Optional[pd.Series]:
    """The largest budget whose mean drop over seeds is within max_drop (ties: the higher mean
    top-1); of its seeds, the most accurate point. None if no budget qualifies."""
    groups = table.groupby(["method", "budget"]).agg(drop=("top1_drop", "mean"), top1=("top1", "mean")).reset_index()
    ok = groups[groups["drop"] <= max_drop + 1e-12]
    if ok.empty:
        return None
    best = ok.sort_values(["budget", "top1"], ascending=False).iloc[0]
    rows = table[(table.method == best.method) & (table.budget == best.budget)]
    return rows.sort_values("top1", ascending=False).iloc[0]


def register_point(point: PipelineConfig, name: str) -> Dict:
    """The chosen point as a pipeline run of its own: benchmarked alone against the baseline, logged
    stage by stage, registered (the registry gate decides champion or not)."""
    execute(STAGES["benchmark"], point)
    with pipeline_run(point, f"sweep pick {name}", {"runner": "sweep", "sweep_point": name}) as run_id:
        for stage in STAGES:
            log_stage(point, stage, run_id)
        return {"mlflow_run_id": run_id, **register(point, run_id)}


@flow(name="sweep")
def sweep(config: PipelineConfig = PipelineConfig(), run_name: Optional[str] = None) -> Dict:
    logger = get_run_logger()
    check(config)
    check_reachable(config)
    started = time.perf_counter()
    with hold(config, "python -m flows.sweep"):
        for name in SHARED:
            outcome = execute(STAGES[name], config)
            logger.info("%s: %s", name, "up to date" if outcome.skipped else f"done in {outcome.seconds:.0f} s")
        pts = {point_name(*p): point_config(config, *p) for p in points(config)}
        for point in pts.values():
            link_shared(config, point)
        futures = {name: train_point.with_options(task_run_name=name).submit(point) for name, point in pts.items()}
        trained = {name: f.result() for name, f in futures.items()}
        training_s = time.perf_counter() - started
        folder = Path(config.paths.outputs) / SWEEP_DIR
        with tempfile.TemporaryDirectory() as tmp:
            timings = benchmark_all(config, pts, Path(tmp))
        table = frontier(config, pts, timings, trained)
        table.to_csv(folder / TABLE, index=False)
        timings.to_csv(folder / "timings.csv", index=False)
        plot(table, config, timings.runtime.iloc[0], folder / PLOT)
        result = {"points": len(pts), "table": str(folder / TABLE), "plot": str(folder / PLOT),
                  "training_seconds": training_s, "seconds": time.perf_counter() - started}
        with pipeline_run(config, run_name or "sweep", {"runner": "sweep"}) as run_id:
            for f in (TABLE, PLOT, "timings.csv"):
                mlflow.log_artifact(str(folder / f))
            for row in table.itertuples():
                mlflow.log_metrics({f"{row.point}/top1": row.top1,
                                    f"{row.point}/speedup_b{config.gate_batch_size}":
                                        getattr(row, f"speedup_b{config.gate_batch_size}")})
            mlflow.log_metrics({"sweep_seconds": result["seconds"], "training_seconds": training_s})
        result["mlflow_run_id"] = run_id
        max_drop = config.select.max_drop
        if max_drop is not None:
            chosen = pick(table, max_drop)
            if chosen is None:
                result["pick"] = f"no budget keeps the mean top-1 drop within select.max_drop={max_drop}"
            else:
                result["pick"] = chosen.point
                if config.registry.enabled:
                    result["registry"] = register_point(pts[chosen.point], chosen.point)
        return result


def report(result: Dict, table: pd.DataFrame) -> str:
    lines = ["", table[["method", "budget", "seed", "heads_replaced", "top1", "top1_drop"]
                       + [c for c in table.columns if c.startswith("speedup_b")]].to_string(index=False), "",
             f"{result['points']} points in {result['seconds'] / 60:.1f} min (training {result['training_seconds'] / 60:.1f}"
             f" min); table {result['table']}, plot {result['plot']}; MLflow run {result['mlflow_run_id']}"]
    if "pick" in result:
        lines.append(f"select.max_drop: {result['pick']}")
    reg = result.get("registry")
    if reg:
        lines.append(f"Registered {reg['model_name']} version {reg['version']}: {reg['promotion']} "
                     f"({'; '.join(reg['reasons'])})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_command_line("python -m flows.sweep", __doc__, argv)
    config = checked_config(args.params, args.overrides)
    if config is None:
        return 2
    with contextlib.ExitStack() as stack:
        try:
            check(config)
            check_reachable(config)
            stack.enter_context(hold(config, "python -m flows.sweep"))
        except ConvHeadsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with prefect_api():
            state = sweep.with_options(task_runner=task_runner(config))(config=config, run_name=args.run_name,
                                                                        return_state=True)
    status = exit_status(state)
    if status == 0:
        result = state.result()
        print(report(result, pd.read_csv(result["table"])))
    return status


if __name__ == "__main__":
    sys.exit(main())
