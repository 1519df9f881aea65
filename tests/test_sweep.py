"""flows.sweep: the frontier table and plot, the Dask path on a local cluster, bad input before any training."""
import os
import socket
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import seg_params, tiny_params

from flows import sweep as sweep_flow
from pipeline.config import validate

PROJECT = Path(__file__).resolve().parent.parent


def assert_speedups_are_the_timed_ratios(table, result):
    """speedup_b4 of a point is the baseline's median latency over the point's, both timed in this sweep."""
    timings = pd.read_csv(Path(result["table"]).with_name("timings.csv"))
    ms = timings[timings.batch_size == 4].set_index("model").infer_step_time
    assert np.allclose(table.speedup_b4, ms["baseline"] / table.point.map(ms))
    assert table.speedup_b4.between(0.1, 10).all()


def sweep_config(root, **sweep):
    p = tiny_params(root)
    p["sweep"] = {"budgets": [0.5], "methods": ["sigma_h", "random"], "seeds": [0], "recover_epochs": 1, **sweep}
    return p


@pytest.mark.slow
def test_sweep_writes_a_row_per_point_a_plot_and_registers_the_pick(finished_pipeline, prefect_api):
    p = sweep_config(finished_pipeline, budgets=[0.5, 1.0], methods=["dsp", "drop"], seeds=[0, 1])
    p["select"]["max_drop"] = 1.0
    result = sweep_flow.sweep(config=validate(p))
    table = pd.read_csv(result["table"])
    assert len(table) == 8 and not table.duplicated(["method", "budget", "seed"]).any()
    assert set(table.method) == {"drop", "dsp"} and set(table.seed) == {0, 1}
    assert (table.heads_replaced == table.budget * 8).all() and table.top1.between(0, 1).all()
    assert_speedups_are_the_timed_ratios(table, result)
    assert Path(result["plot"]).stat().st_size > 10_000
    assert result["pick"] in set(table.point) and table.set_index("point").budget[result["pick"]] == 1.0
    assert result["registry"]["version"] == 1
    mlflow.set_tracking_uri(p["tracking"]["tracking_uri"])
    logged = {f.path for f in mlflow.MlflowClient().list_artifacts(result["mlflow_run_id"])}
    assert {"frontier.csv", "frontier.png", "timings.csv"} <= logged
    # the shared baseline and scores were reused, not retrained
    assert all(os.path.islink(finished_pipeline / "outputs/sweep/points" / name / "baseline") for name in table.point)


@pytest.mark.slow
def test_a_segmentation_sweep_plots_miou_and_picks_by_its_drop(prefect_api, tmp_path):
    p = seg_params(tmp_path)
    p["sweep"] = {"budgets": [0.5], "methods": ["sigma_b", "dsp"], "seeds": [0], "recover_epochs": 1}
    p["select"]["max_drop"] = 1.0
    p["registry"].update(min_speedup=0.01, max_drop=1.0)
    result = sweep_flow.sweep(config=validate(p))
    table = pd.read_csv(result["table"])
    assert sorted(table.method) == ["dsp", "sigma_b"] and "top1" not in table
    assert table.miou.between(0, 1).all() and np.allclose(table.miou_drop, table.baseline_miou - table.miou)
    assert result["metric"] == "miou"
    assert (table.heads_replaced == 4).all()
    assert_speedups_are_the_timed_ratios(table, result)
    assert result["pick"] in set(table.point) and result["registry"]["model_name"].endswith("-segmentation")


@pytest.mark.slow
def test_points_run_on_a_local_two_worker_dask_cluster(finished_pipeline, prefect_api, monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setenv("PYTHONPATH", str(PROJECT))  # the workers import flows.sweep
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cfg = validate(sweep_config(finished_pipeline, task_runner="dask", address=cluster.scheduler_address))
        result = sweep_flow.sweep.with_options(task_runner=sweep_flow.task_runner(cfg))(config=cfg)
        with Client(cluster) as client:
            workers = {f"{socket.gethostname()}:{pid}" for pid in client.run(os.getpid).values()}
    table = pd.read_csv(result["table"])
    assert sorted(table.method) == ["random", "sigma_h"]
    assert set(table.worker) <= workers and f"{socket.gethostname()}:{os.getpid()}" not in workers  # on the cluster


@pytest.mark.parametrize("overrides, message", [
    (["sweep.budgets=[]"], "sweep.budgets: List should have at least 1 item"),
    (["sweep.methods=[sigma_h, magic]"], "sweep.methods.1: Input should be 'sigma_h'"),
    (["sweep.budgets=[0.5, 2]"], "budgets are fractions"),
    (["select.dsp.temperature_start=0.001", "select.dsp.temperature_end=1"],
     "select.dsp: the DSP temperature must fall"),
    (["sweep.task_runner=dask"], "needs sweep.address"),
    (["sweep.task_runner=dask", "sweep.address=tcp://127.0.0.1:9"], "Dask scheduler at tcp://127.0.0.1:9"),
])
def test_bad_sweep_input_fails_in_seconds_before_any_training(tmp_path, overrides, message, capsys):
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    started = time.monotonic()
    assert sweep_flow.main(["--params", str(params), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - started < 30 and not (tmp_path / "outputs").exists()
