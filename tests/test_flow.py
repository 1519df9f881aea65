"""The Prefect flow, run for real (Prefect's test harness) against a real MLflow SQLite store."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from helpers import tiny_params

from convheads import ConvHeadsError, load_model
from convheads.engine.evaluation import evaluate
from flows.compress import compress
from flows.promote import main as promote_main
from flows.promote import promote
from pipeline.config import validate
from pipeline.dag import STAGES
from pipeline.loaders import loader
from pipeline.registry import CHALLENGER, CHAMPION
from pipeline.tracking import LOGGED_TAG, log_stage

pytestmark = pytest.mark.slow  # whole flows, with a Prefect server

PROJECT = Path(__file__).resolve().parent.parent


def test_the_flow_logs_every_stage_to_one_mlflow_run_and_skips_when_up_to_date(prefect_api, tmp_path, capsys):
    params = tiny_params(tmp_path)
    params["registry"].update(min_speedup=0.01, max_drop=1.0)  # gate on accuracy: speed is noise at this size
    tiny_config = validate(params)
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

    # a retried tracking task logs nothing twice, also after an attempt that died halfway
    log_stage(tiny_config, "recover", run.info.run_id)
    nested = {c.data.tags["stage"]: c for c in client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    client.delete_tag(nested["recover"].info.run_id, LOGGED_TAG)
    log_stage(tiny_config, "recover", run.info.run_id)
    assert len(client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")) == 8
    assert len(client.search_logged_models([run.info.experiment_id])) == 2

    # a second run with nothing changed retrains and registers nothing, and says what it found
    assert registry["promotion"] == CHAMPION
    again = compress(config=tiny_config)
    assert again["skipped"] and again["mlflow_run_id"] != result["mlflow_run_id"]
    assert f"nothing changed since run {result['mlflow_run_id']}" in again["reason"]
    assert f"registered as {registry['model_name']} version 1 (champion)" in again["reason"]
    skipped_run = client.get_run(again["mlflow_run_id"])
    assert skipped_run.data.tags["skipped"] == "true" and skipped_run.data.tags["skip_reason"] == again["reason"]
    assert again["compressed_top1"] == result["compressed_top1"]
    assert len(client.search_logged_models([run.info.experiment_id])) == 2
    assert len(client.search_model_versions(f"name = '{registry['model_name']}'")) == 1

    # a lost registration is registered again from the same run, without retraining or logging again
    client.delete_model_version(registry["model_name"], "1")
    third = compress(config=tiny_config)
    assert third["skipped"] and "is gone from the registry: registering its model now" in third["reason"]
    assert third["registry"]["version"] == 2 and third["registry"]["promotion"] == CHAMPION
    assert client.get_model_version(registry["model_name"], "2").run_id == result["mlflow_run_id"]
    assert len(client.search_logged_models([run.info.experiment_id])) == 2
    assert compress(config=tiny_config)["skipped"]  # and now it is all there again

    # new data (another split): the champion, logged as pt2, is measured again on the new test split
    champion_file = tmp_path / "champion.pt"
    shutil.copy(out / "recover/model.pt", champion_file)
    new_data = validate({**params, "data": {**params["data"], "seed": 1}})
    fourth = compress(config=new_data)
    new_version = json.loads((Path(tiny_config.paths.data) / "stage.json").read_text())["summary"]["data_version"]
    assert not fourth["skipped"] and new_version != data_version
    assert fourth["registry"]["version"] == 3 and fourth["registry"]["previous_champion"] == 2
    champion = load_model(champion_file)
    expected = evaluate(champion, loader(new_data, champion, "test", 64), progress=False)["top1"]
    assert fourth["registry"]["champion_top1"] == expected
    assert client.get_model_version(registry["model_name"], "3").tags["data_version"] == new_version

    # the manual promotion flow moves champion, and refuses what does not exist
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(new_data.model_dump(mode="json")))
    assert promote("3", params_file=str(params_file))["version"] == 3
    assert client.get_registered_model(registry["model_name"]).aliases[CHAMPION] in (3, "3")
    state = promote("5", params_file=str(params_file), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConvHeadsError, match="has no version '5'"):
        state.result()
    assert promote_main(["5", "--params", str(params_file)]) == 2  # the command line: a message, no traceback
    assert "has no version '5'" in capsys.readouterr().err
    assert client.get_registered_model(registry["model_name"]).aliases[CHAMPION] in (3, "3")


def test_the_command_line_rejects_bad_configuration_before_any_work(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "flows.compress", "--params", str(tmp_path / "photo.yaml")],
                             cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "photo.yaml does not exist (presets: " in missing.stderr
    (tmp_path / "none.yaml").write_text("{}\n")  # every key at its default
    proc = subprocess.run([sys.executable, "-m", "flows.compress", "--params", str(tmp_path / "none.yaml"),
                           "recover.epoch=3"], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "recover.epoch: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()

    proc = subprocess.run([sys.executable, "-m", "flows.serve", "--params", str(tmp_path / "none.yaml"),
                           "schedule.cron=every day"], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "schedule.cron 'every day'" in proc.stderr and "Traceback" not in proc.stderr

