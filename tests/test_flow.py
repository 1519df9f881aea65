"""The Prefect flow, run for real (Prefect's test harness) against a real MLflow SQLite store."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

import yaml
from prefect import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL

from convheads import ConvHeadsError, load_model
from flows.compress import compress
from flows.promote import main as promote_main, promote
from tasks.config import validate
from tasks.registry import CHALLENGER, CHAMPION
from tasks.pipeline import STAGES
from conftest import tiny_params

PROJECT = Path(__file__).resolve().parent.parent


def test_the_flow_logs_every_stage_to_one_mlflow_run_and_skips_when_up_to_date(prefect_api, tiny_config, tmp_path,
                                                                                capsys):
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
    assert not result["skipped"]
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

    # the run registered its compressed model as a new version, the challenger
    registry = result["registry"]
    assert registry["version"] == 1 and registry["model_name"] == "convheads-vit_tiny_patch16_224"
    version = client.get_model_version(registry["model_name"], "1")
    assert version.run_id == run.info.run_id and version.tags["promotion"] == registry["promotion"]
    assert client.get_registered_model(registry["model_name"]).aliases[CHALLENGER] in (1, "1")

    # a second run with nothing changed retrains and registers nothing, and says so
    again = compress(config=tiny_config)
    assert again["skipped"] and again["mlflow_run_id"] != result["mlflow_run_id"]
    assert f"nothing changed since run {result['mlflow_run_id']}" in again["reason"]
    skipped_run = client.get_run(again["mlflow_run_id"])
    assert skipped_run.data.tags["skipped"] == "true" and skipped_run.data.tags["skip_reason"] == again["reason"]
    assert again["compressed_top1"] == result["compressed_top1"]
    assert len(client.search_logged_models([run.info.experiment_id])) == 2
    assert len(client.search_model_versions(f"name = '{registry['model_name']}'")) == 1

    # the manual promotion flow moves champion, and refuses what does not exist
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    assert promote("1", params_file=str(params))["version"] == 1
    assert client.get_registered_model(registry["model_name"]).aliases[CHAMPION] in (1, "1")
    state = promote("5", params_file=str(params), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConvHeadsError, match="has no version '5'"):
        state.result()
    assert promote_main(["5", "--params", str(params)]) == 2  # the command line: a message, no traceback
    assert "has no version '5'" in capsys.readouterr().err
    assert client.get_registered_model(registry["model_name"]).aliases[CHAMPION] in (1, "1")


def test_the_command_line_rejects_bad_configuration_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.compress", "--params", str(tmp_path / "none.yaml"),
                           "recover.epoch=3"], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "recover.epoch: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()

    proc = subprocess.run([sys.executable, "-m", "flows.serve", "--params", str(tmp_path / "none.yaml"),
                           "schedule.cron=every day"], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "schedule.cron 'every day'" in proc.stderr and "Traceback" not in proc.stderr


def test_the_scheduled_deployment_exists_and_runs_on_demand(prefect_api, tmp_path):
    params = tiny_params(tmp_path)
    params["schedule"] = {"deployment": "nightly-test", "cron": "30 2 * * 1", "timezone": "Europe/Paris"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONPATH": str(PROJECT)}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "flows.serve", "--params", str(tmp_path / "params.yaml")],
                              cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deployment = None
        with get_client(sync_client=True) as client:
            for _ in range(240):
                try:
                    deployment = client.read_deployment_by_name("compress/nightly-test")
                    break
                except Exception:  # noqa: BLE001 -- not registered yet
                    assert server.poll() is None, (tmp_path / "serve.log").read_text()
                    time.sleep(0.5)
        assert deployment is not None, (tmp_path / "serve.log").read_text()
        schedule = deployment.schedules[0].schedule
        assert (schedule.cron, schedule.timezone) == ("30 2 * * 1", "Europe/Paris")
        assert validate(deployment.parameters["config"]) == validate(params)

        flow_run = run_deployment("compress/nightly-test", timeout=600)
        assert flow_run.state.is_completed(), (tmp_path / "serve.log").read_text()[-5000:]
        assert (tmp_path / "outputs/benchmark/benchmark.json").is_file()
        runs = mlflow.MlflowClient(params["tracking"]["tracking_uri"]).search_runs(
            [mlflow.MlflowClient(params["tracking"]["tracking_uri"]).get_experiment_by_name("convheads").experiment_id])
        assert [r.data.tags["prefect_flow_run_id"] for r in runs if "prefect_flow_run_id" in r.data.tags] == \
            [str(flow_run.id)]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
