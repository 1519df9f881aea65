"""The Prefect flow, run for real (Prefect's test harness) against a real MLflow SQLite store."""
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from convheads import load_model
from flows.compress import compress
from tasks.stages import STAGES

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_flow_logs_every_stage_to_one_mlflow_run_and_skips_when_up_to_date(prefect_api, tiny_config, tmp_path):
    result = compress(config=tiny_config)
    client = mlflow.MlflowClient(tiny_config.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    out = Path(tiny_config.paths.outputs)
    metrics = json.loads((out / "evaluate/metrics.json").read_text())

    # the parent run: configuration, tags, headline metrics, both models
    assert run.data.params["recover.epochs"] == "1" and run.data.params["model.kwargs.depth"] == "2"
    data_version = json.loads((Path(tiny_config.paths.data) / "stage.json").read_text())["summary"]["data_version"]
    assert run.data.tags["data_version"] == data_version
    assert run.data.tags["runner"] == "prefect" and len(run.data.tags["git_commit"]) >= 7
    assert run.data.metrics["evaluate/compressed/top1"] == pytest.approx(metrics["compressed"]["top1"])
    assert result["compressed_top1"] == pytest.approx(metrics["compressed"]["top1"])
    assert result["skipped_stages"] == []
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"params.yaml", "summary.txt"}

    # a nested run per stage, with its files
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    by_stage = {c.data.tags["stage"]: c for c in children}
    assert set(by_stage) == set(STAGES)
    files = {s: {a.path for a in client.list_artifacts(c.info.run_id)} for s, c in by_stage.items()}
    assert {"heatmap.png", "selection.json"} <= files["select"]
    assert "scores.csv" in files["score"] and "benchmark.csv" in files["benchmark"]
    assert files["data"] == {"manifest.csv", "meta.json", "stage.json"}
    history = client.get_metric_history(by_stage["baseline"].info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]

    # the logged models carry signatures and give the saved models' outputs
    logged = {m.name: m for m in client.search_logged_models([run.info.experiment_id])}
    assert set(logged) == {"baseline_model", "compressed_model"}
    model_info = mlflow.models.get_model_info(logged["compressed_model"].model_uri)
    assert tuple(model_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 16, 16)
    mlflow.set_tracking_uri(tiny_config.tracking.tracking_uri)
    loaded = mlflow.pytorch.load_model(logged["compressed_model"].model_uri)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded(x), load_model(out / "recover/model.pt")(x), atol=1e-5, rtol=1e-5)

    # a second run finds everything up to date, and still records a complete run
    again = compress(config=tiny_config)
    assert again["skipped_stages"] == list(STAGES)
    assert again["mlflow_run_id"] != result["mlflow_run_id"]
    assert again["compressed_top1"] == result["compressed_top1"]


def test_the_command_line_rejects_bad_configuration_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.compress", "--params", str(tmp_path / "none.yaml"),
                           "recover.epoch=3"], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "recover.epoch: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
