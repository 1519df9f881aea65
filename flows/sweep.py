"""The accuracy-vs-speed frontier: which rule, and how many heads, for this model and data.

    python -m flows.sweep                                    # params.yaml's sweep: section
    python -m flows.sweep sweep.budgets=[0.25,0.5] sweep.methods=[sigma_h,random] sweep.seeds=[0,1,2]
    python -m flows.sweep sweep.task_runner=dask sweep.address=tcp://scheduler:8786
    python -m flows.sweep task=segmentation                  # mIoU in place of top-1

One shared baseline and one shared score file (the pipeline's own stages, in paths.outputs); then
for every (method, budget, seed) a point: select + replace + recover + evaluate in its own folder,
outputs/sweep/points/<method>-<budget>-s<seed>/, as a Prefect task on the configured task runner
(local: one after another; dask: on the cluster's workers). When every point has trained, every
model is timed in this process, interleaved with the baseline (never while others train). Writes
outputs/sweep/frontier.csv (a row per point) and frontier.png (accuracy vs measured speedup, a curve
per method, error bars over seeds), also to one MLflow run. With select.max_drop set, the largest
budget whose mean drop of the headline metric (top-1; mIoU for segmentation) stays within it is
benchmarked as a pipeline run of its own and handed to the registry gate.
"""
import contextlib
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlparse

import mlflow
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from convheads import ConvHeadsError
from flows import checked_config, exit_status, parse_command_line, prefect_api, quiet_failure
from pipeline import preflight
from pipeline.config import PipelineConfig
from pipeline.dag import STAGES
from pipeline.frontier import (
    PLOT,
    POINT_STAGES,
    SHARED,
    SWEEP_DIR,
    TABLE,
    benchmark_all,
    frontier,
    link_shared,
    pick,
    plot,
    point_config,
    point_name,
    points,
)
from pipeline.lock import hold
from pipeline.problems import problem
from pipeline.registry import register
from pipeline.runner import execute
from pipeline.tracking import check_reachable, log_stage, pipeline_run


@task(cache_policy=NONE)
def train_point(point: PipelineConfig) -> Dict:
    """select + replace + recover + evaluate of one point (each skipped when up to date)."""
    started = time.perf_counter()
    if multiprocessing.current_process().daemon:  # a Dask worker: it may not start DataLoader workers
        point = point.model_copy(update={"loader": point.loader.model_copy(update={"num_workers": 0})})
    skipped = [execute(STAGES[name], point).skipped for name in POINT_STAGES]
    return {"seconds": time.perf_counter() - started, "skipped": all(skipped),
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


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


def check(cfg: PipelineConfig) -> None:
    """Bad input fails here, before any training: every point's configuration and budget."""
    preflight.check(cfg)
    for method, budget, seed in points(cfg):
        try:
            point_config(cfg, method, budget, seed)
        except ConvHeadsError as e:
            raise ConvHeadsError(f"sweep point {point_name(method, budget, seed)}: {e}") from None
    if cfg.sweep.task_runner == "dask":
        check_cluster(cfg.sweep.address)


def register_point(point: PipelineConfig, name: str) -> Dict:
    """The chosen point as a pipeline run of its own: benchmarked alone against the baseline, logged
    stage by stage, registered (the registry gate decides champion or not)."""
    execute(STAGES["benchmark"], point)
    with pipeline_run(point, f"sweep pick {name}", {"runner": "sweep", "sweep_point": name}) as run_id:
        for stage in STAGES:
            log_stage(point, stage, run_id)
        return {"mlflow_run_id": run_id, **register(point, run_id)}


@flow(name="sweep")
@quiet_failure
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
        metric = problem(config).headline
        table.to_csv(folder / TABLE, index=False)
        timings.to_csv(folder / "timings.csv", index=False)
        plot(table, config, timings.runtime.iloc[0], folder / PLOT)
        result = {"points": len(pts), "metric": metric, "table": str(folder / TABLE), "plot": str(folder / PLOT),
                  "training_seconds": training_s, "seconds": time.perf_counter() - started}
        with pipeline_run(config, run_name or "sweep", {"runner": "sweep"}) as run_id:
            for f in (TABLE, PLOT, "timings.csv"):
                mlflow.log_artifact(str(folder / f))
            speed = f"speedup_b{config.gate_batch_size}"
            for row in table.to_dict("records"):
                mlflow.log_metrics({f"{row['point']}/{metric}": row[metric], f"{row['point']}/{speed}": row[speed]})
            mlflow.log_metrics({"sweep_seconds": result["seconds"], "training_seconds": training_s})
        result["mlflow_run_id"] = run_id
        max_drop = config.select.max_drop
        if max_drop is not None:
            chosen = pick(table, max_drop, metric)
            if chosen is None:
                result["pick"] = f"no budget keeps the mean {metric} drop within select.max_drop={max_drop}"
            else:
                result["pick"] = chosen.point
                if config.registry.enabled:
                    result["registry"] = register_point(pts[chosen.point], chosen.point)
        return result


def closing_lines(result: Dict, table: pd.DataFrame) -> str:
    metric = result["metric"]
    lines = ["", table[["method", "budget", "seed", "heads_replaced", metric, f"{metric}_drop"]
                       + [c for c in table.columns if c.startswith("speedup_b")]].to_string(index=False), "",
             f"{result['points']} points in {result['seconds'] / 60:.1f} min "
             f"(training {result['training_seconds'] / 60:.1f} min); table {result['table']}, plot {result['plot']}; "
             f"MLflow run {result['mlflow_run_id']}"]
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
        print(closing_lines(result, pd.read_csv(result["table"])))
    return status


if __name__ == "__main__":
    sys.exit(main())
