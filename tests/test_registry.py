"""Registry promotion against a real MLflow SQLite store: the gate, aliases, manual promotion,
two registrations at once."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
import yaml
from helpers import mlflow_server, tiny_params

from convheads import ConvHeadsError, create_model, load_model, save_model
from pipeline.config import load_config, validate
from pipeline.dag import STAGES
from pipeline.registry import CHALLENGER, CHAMPION, MODEL_CARD, deployed, gate, register, set_champion
from pipeline.runner import execute, output_dir, read_record
from pipeline.summary import binomial_interval
from pipeline.tracking import LOGGED_MODELS, client_for, log_model, log_stage, pipeline_run

PROJECT = Path(__file__).resolve().parent.parent


def test_the_gate_gives_a_reason_for_every_check():
    cfg = validate({**tiny_params("/tmp/x"), "registry": {"max_drop": 0.02, "min_speedup": 1.1}})
    ok = gate(score=0.95, drop=0.01, speedup=1.2, champion_score=0.94, cfg=cfg)
    assert ok.promoted and ok.reasons == [
        "top-1 drop 1.00 pts <= max 2.00 pts", "speedup 1.200x (batch 4) >= min 1.100x",
        "top-1 0.9500 > champion's 0.9400 on the same test data"]
    assert not gate(0.95, 0.03, 1.2, None, cfg).promoted
    assert not gate(0.95, 0.01, 1.05, None, cfg).promoted
    tie = gate(0.94, 0.01, 1.2, 0.94, cfg)
    assert not tie.promoted and tie.reasons[-1] == "top-1 0.9400 <= champion's 0.9400 on the same test data"
    assert gate(0.95, 0.01, 1.2, None, cfg).reasons[-1] == "no current champion"


@pytest.fixture
def pipeline(finished_pipeline):
    """The tiny pipeline's outputs, with a gate that looks at accuracy (speed is noise at this size)."""
    cfg = validate({**tiny_params(finished_pipeline), "registry": {"min_speedup": 0.01, "max_drop": 0.5}})
    assert all(execute(stage, cfg).skipped for stage in STAGES.values())  # the copy is up to date
    return cfg


def candidate(cfg, top1, scale=None, register_it=True):
    """A pipeline run whose compressed model scores `top1` (and is perturbed by `scale`), registered."""
    path = output_dir(cfg, "evaluate") / "stage.json"
    record = json.loads(path.read_text())
    record["summary"]["compressed"]["top1"] = top1
    record["summary"]["top1_drop"] = record["summary"]["baseline"]["top1"] - top1
    path.write_text(json.dumps(record))
    if scale is not None:  # make this run's model distinguishable from the others'
        model = load_model(output_dir(cfg, "recover") / "model.pt")
        with torch.no_grad():
            model.head.weight.mul_(scale)
        save_model(model, output_dir(cfg, "recover") / "model.pt")
    with pipeline_run(cfg) as run_id:
        log_model(cfg, "recover", LOGGED_MODELS["recover"])
    return run_id, register(cfg, run_id) if register_it else None


def champion_outputs(cfg, x):
    """The champion's outputs on x, loaded back as the registry loads a version (MLflow's pyfunc:
    a pt2 model comes back as an exported program)."""
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model_name}@{CHAMPION}")
    return torch.as_tensor(np.asarray(model.predict(x.numpy())))


def aliases(cfg):
    return {k: str(v) for k, v in client_for(cfg).get_registered_model(cfg.registered_model_name).aliases.items()}


@pytest.mark.slow
def test_champion_challenger_promotion_and_rollback(pipeline):
    cfg, client, name = pipeline, client_for(pipeline), pipeline.registered_model_name
    assert name == "convheads-vit_tiny_patch16_224"
    x = torch.randn(2, 3, 16, 16)

    run1, first = candidate(cfg, 0.60, scale=1.0)
    v1_outputs = load_model(output_dir(cfg, "recover") / "model.pt")(x)
    assert first["promotion"] == CHAMPION and first["reasons"][-1] == "no current champion"
    assert aliases(cfg) == {CHAMPION: "1", CHALLENGER: "1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["base_model"] == "vit_tiny_patch16_224" and tags["heads_replaced"] == "4"
    assert tags["top1"] == "0.6" and tags["promotion"] == CHAMPION and len(tags["data_version"]) == 64
    assert {"top1_drop", "speedup", "git_commit"} <= set(tags)
    run = client.get_run(run1)
    assert run.data.tags["promotion"] == CHAMPION and run.data.tags["registry_version"] == f"{name}/1"
    torch.testing.assert_close(champion_outputs(cfg, x), v1_outputs, atol=1e-5, rtol=1e-5)

    _, worse = candidate(cfg, 0.55, scale=2.0)
    assert worse["promotion"] == "rejected" and worse["previous_champion"] == 1
    assert worse["reasons"][-1] == "top-1 0.5500 <= champion's 0.6000 on the same test data"
    assert aliases(cfg) == {CHAMPION: "1", CHALLENGER: "2"}
    assert client.get_model_version(name, "2").tags["promotion"] == "rejected"

    top1 = 263 / 270  # 0.974074...: read back from a tag rounded to 6 decimals, an equal model "beat" it
    _, better = candidate(cfg, top1, scale=3.0)
    v3_outputs = load_model(output_dir(cfg, "recover") / "model.pt")(x)
    assert better["promotion"] == CHAMPION and aliases(cfg) == {CHAMPION: "3", CHALLENGER: "3"}
    torch.testing.assert_close(champion_outputs(cfg, x), v3_outputs, atol=1e-5, rtol=1e-5)

    # a rerun of the same thing never moves champion: compared at full precision
    _, same = candidate(cfg, top1)
    assert same["promotion"] == "rejected" and same["champion_top1"] == top1
    assert same["reasons"][-1] == "top-1 0.9741 <= champion's 0.9741 on the same test data"
    assert aliases(cfg) == {CHAMPION: "3", CHALLENGER: "4"}

    # another architecture under the same name is not compared: refused, with the reason tagged
    deeper = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4,
                          num_classes=10)
    save_model(deeper, output_dir(cfg, "recover") / "model.pt")
    _, other = candidate(cfg, 0.99)
    assert other["promotion"] == "rejected" and aliases(cfg)[CHAMPION] == "3"
    assert other["reasons"][-1].startswith("not compared with champion version 3: a different architecture "
                                           "(2 blocks, width 32 (4 heads), patch 4x4, input 16x16, ")
    assert "from this model (3 blocks, width 32" in other["reasons"][-1]
    assert "registry.model_name" in client.get_model_version(name, "5").tags["promotion_reasons"]

    rolled = set_champion(client, name, "1", reason="rollback")
    assert rolled == {"model_name": name, "version": 1, "previous_champion": 3}
    assert aliases(cfg)[CHAMPION] == "1"
    assert client.get_model_version(name, "1").tags["promotion"] == "champion (rollback)"
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    torch.testing.assert_close(champion_outputs(cfg, x), v1_outputs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v1_outputs, v3_outputs)


@pytest.mark.slow
def test_every_version_carries_a_model_card_the_mlflow_ui_reads(pipeline, tmp_path):
    cfg, client, name = pipeline, client_for(pipeline), pipeline.registered_model_name
    candidate(cfg, 0.6, register_it=False)  # the evaluated top-1 set to 0.6
    with pipeline_run(cfg) as run_id:  # a run as the flow logs it: the baseline stage in a nested run
        log_stage(cfg, "baseline", run_id)
        log_model(cfg, "recover", LOGGED_MODELS["recover"])
    result = register(cfg, run_id)
    card = client.get_model_version(name, str(result["version"])).description
    artifact = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_CARD, dst_path=str(tmp_path),
                                                   tracking_uri=cfg.tracking.tracking_uri)
    assert Path(artifact).read_text() == card
    ev, bench = read_record(cfg, "evaluate")["summary"], read_record(cfg, "benchmark")["summary"]
    n = ev["num_images"]
    low, high = binomial_interval(round(0.6 * n), n)
    assert low < 0.6 < high
    assert f"# {name} version 1\n" in card
    assert f"| test top-1 | **60.00%**; 95% interval {low:.2%} to {high:.2%} (exact binomial, {n:,} test images) |" \
           in card
    assert f"| speedup | **{bench['speedup_b4']:.3f}x** at batch 4 in onnxruntime, the deployment runtime" in card
    data_version = read_record(cfg, "data")["summary"]["data_version"]
    assert f"data version `{data_version}`" in card and "| selection | " in card and "4 of 8 attention heads" in card
    baseline = re.search(r"nested run `(\w+)` \(stage baseline\) of MLflow run `(\w+)`", card)
    assert baseline.group(2) == run_id and client.get_run(baseline.group(1)).data.tags["stage"] == "baseline"
    assert "| promotion | champion: " in card and "no current champion" in card
    # the command reproduces this run's configuration exactly, at the commit it ran
    commit = client.get_run(run_id).data.tags["git_commit"]
    reproduce = card.split("```bash\n")[1].split("```")[0].splitlines()
    assert reproduce[0] == f"git checkout {commit.removesuffix('-dirty')}"
    argv = shlex.split(reproduce[1])
    assert argv[:3] == ["python", "-m", "flows.compress"] and load_config(None, argv[3:]) == cfg
    # what the MLflow UI shows: its model-version page reads the description through this endpoint
    with mlflow_server(cfg.tracking.tracking_uri, tmp_path) as url:
        for api in ("ajax-api", "api"):
            answer = requests.get(f"{url}/{api}/2.0/mlflow/model-versions/get", timeout=30,
                                  params={"name": name, "version": "1"})
            assert answer.ok and answer.json()["model_version"]["description"] == card
        assert "<html" in requests.get(url, timeout=30).text.lower()  # the UI itself is served


@pytest.mark.slow
def test_a_failed_gate_registers_but_never_crowns(pipeline):
    cfg = validate({**pipeline.model_dump(mode="json"), "registry": {"max_drop": 0.0, "min_speedup": 0.01}})
    _, result = candidate(cfg, 0.0)
    assert result["promotion"] == "rejected" and "max 0.00 pts" in result["reasons"][0]
    assert aliases(cfg) == {CHALLENGER: "1"}


@pytest.mark.slow
def test_bad_manual_promotions_leave_the_registry_unchanged(pipeline):
    cfg, client, name = pipeline, client_for(pipeline), pipeline.registered_model_name
    with pytest.raises(ConvHeadsError, match="the registry is empty"):
        set_champion(client, name, "1")
    candidate(cfg, 0.6)
    client.create_registered_model("other-model")
    before = (aliases(cfg), [v.version for v in client.search_model_versions(f"name = '{name}'")])
    for version, match in [
        ("7", r"has no version '7'; versions: 1"),
        ("models:/other-model/1", "is a version of model 'other-model', not of"),
    ]:
        with pytest.raises(ConvHeadsError, match=match):
            set_champion(client, name, version)
    with pytest.raises(ConvHeadsError, match="no registered model 'nope'; known: "):
        set_champion(client, "nope", "1")
    with pytest.raises(ConvHeadsError, match="'other-model' has no versions yet"):
        set_champion(client, "other-model", "1")
    assert (aliases(cfg), [v.version for v in client.search_model_versions(f"name = '{name}'")]) == before
    assert not client.get_registered_model("other-model").aliases


@pytest.mark.slow
def test_registering_the_same_run_twice_reuses_its_version(pipeline):
    run_id, first = candidate(pipeline, 0.6)
    again = register(pipeline, run_id)
    assert again["version"] == first["version"] == 1
    assert len(client_for(pipeline).search_model_versions(f"name = '{pipeline.registered_model_name}'")) == 1


def test_the_gate_compares_at_full_precision_and_asks_for_a_minimum_improvement():
    cfg = validate({**tiny_params("/tmp/x"), "registry": {"min_speedup": 1.0}})
    same = gate(263 / 270, 0.01, 1.2, 263 / 270, cfg)  # 0.97407407...: a rerun of the same model
    assert not same.promoted and same.reasons[-1] == "top-1 0.9741 <= champion's 0.9741 on the same test data"
    hair = gate(263 / 270 + 1e-7, 0.01, 1.2, 263 / 270, cfg)
    assert hair.promoted and hair.reasons[-1] == "top-1 0.97407417 > champion's 0.97407407 on the same test data"
    strict = validate({**cfg.model_dump(mode="json"), "registry": {"min_improvement": 0.005}})
    small = gate(0.953, 0.01, 1.2, 0.95, strict)
    assert not small.promoted and small.reasons[-1] == \
        "top-1 0.9530 vs champion's 0.9500 on the same test data: +0.30 pts < min improvement 0.50 pts"
    assert gate(0.956, 0.01, 1.2, 0.95, strict).promoted




def test_the_gate_judges_the_int8_model_where_onnxruntime_int8_is_the_deployment_runtime():
    ev = {"baseline": {"top1": 0.95}, "compressed": {"top1": 0.94}, "compressed_int8": {"top1": 0.92},
          "top1_drop": 0.01, "top1_int8_drop": 0.02}
    assert deployed(ev, {"runtime": "onnxruntime"}, "top1") == ("compressed", 0.94, 0.01)
    model, score, drop = deployed(ev, {"runtime": "onnxruntime-int8"}, "top1")
    assert (model, score) == ("compressed_int8", 0.92) and drop == pytest.approx(0.03)
    with pytest.raises(ConvHeadsError, match="evaluate stage has no INT8 metrics"):
        deployed({k: v for k, v in ev.items() if k != "compressed_int8"}, {"runtime": "onnxruntime-int8"}, "top1")
    cfg = validate({**tiny_params("/tmp/x"), "registry": {"max_drop": 0.02, "min_speedup": 1.1}})
    assert gate(0.94, drop, 1.2, None, cfg, int8=True).reasons[0] == "INT8 top-1 drop 3.00 pts > max 2.00 pts"


@pytest.mark.slow
def test_an_int8_deployment_registers_with_the_int8_accuracy_and_speedup(pipeline):
    cfg, client, name = pipeline, client_for(pipeline), pipeline.registered_model_name
    for stage, changes in (("evaluate", {"compressed_int8": {"top1": 0.5, "top5": 0.9, "loss": 1.0},
                                         "int8_quantization": "static"}),
                           ("benchmark", {"runtime": "onnxruntime-int8", "speedup_b4": 1.5})):
        path = output_dir(cfg, stage) / "stage.json"
        record = json.loads(path.read_text())
        record["summary"].update(changes)
        path.write_text(json.dumps(record))
    baseline = read_record(cfg, "evaluate")["summary"]["baseline"]["top1"]
    _, result = candidate(cfg, 0.6)  # float32 top-1 0.6: what the champion comparison reads
    assert result["reasons"][:2] == [f"INT8 top-1 drop {(baseline - 0.5) * 100:.2f} pts <= max 50.00 pts",
                                     "speedup 1.500x (batch 4) >= min 0.010x"]
    tags = client.get_model_version(name, str(result["version"])).tags
    assert (tags["top1"], tags["top1_int8"], tags["runtime"]) == ("0.6", "0.5", "onnxruntime-int8")
    card = client.get_model_version(name, str(result["version"])).description
    assert "| test top-1 | **50.00%**; " in card and "(static quantization, onnxruntime); float32: 60.00% |" in card
    assert "| speedup | **1.500x** at batch 4 in onnxruntime-int8, the deployment runtime" in card


REGISTER_WHEN_TOLD = """
import json, pathlib, sys, time
import yaml
from pipeline.config import validate
from pipeline.registry import register
params, run_id, go, delay = sys.argv[1:]
cfg = validate(yaml.safe_load(pathlib.Path(params).read_text()))
pathlib.Path(params + ".ready").touch()
while not pathlib.Path(go).exists():
    time.sleep(0.01)
time.sleep(float(delay))
print(json.dumps(register(cfg, run_id)))
"""


@pytest.mark.slow
def test_two_runs_registering_at_once_leave_champion_on_the_better(pipeline, tmp_path):
    """Two processes register against one SQLite store at the same moment. Both must measure the
    champion again (their data version is new), which leaves time for a race: without
    compare-and-set, the worse model, finishing last, would overwrite champion."""
    _, first = candidate(pipeline, 0.5)
    contenders = {}
    for label, top1 in (("better", 0.9), ("worse", 0.7)):
        root = tmp_path / label
        for part in ("data", "outputs"):
            shutil.copytree(Path(pipeline.paths.data).parent if part == "data" else pipeline.paths.outputs,
                            root / part)
        params = {**pipeline.model_dump(mode="json"),
                  "paths": {"data": f"{root}/data/dataset", "outputs": f"{root}/outputs"}}
        cfg = validate(params)
        record_path = Path(cfg.paths.data) / "stage.json"
        record = json.loads(record_path.read_text())
        record["summary"]["data_version"] = "new-data-version"
        record_path.write_text(json.dumps(record))
        run_id, _ = candidate(cfg, top1, register_it=False)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        contenders[label] = (root / "params.yaml", run_id)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    procs = {label: subprocess.Popen([sys.executable, "-c", REGISTER_WHEN_TOLD, str(params), run_id, str(go),
                                      "0" if label == "better" else "0.3"],
                                     cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for label, (params, run_id) in contenders.items()}
    for label, (params, _) in contenders.items():
        while not Path(f"{params}.ready").exists():
            assert procs[label].poll() is None, procs[label].communicate()[1]
            time.sleep(0.05)
    go.touch()
    results = {}
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results[label] = json.loads(out.strip().splitlines()[-1])
    better, worse = results["better"], results["worse"]
    assert better["promotion"] == CHAMPION and better["previous_champion"] == first["version"]
    assert worse["promotion"] == "rejected"
    assert worse["reasons"][-1] == "top-1 0.7000 <= champion's 0.9000 on the same test data"
    assert aliases(pipeline)[CHAMPION] == str(better["version"])
