"""The DVC pipeline, reproduced for real (`dvc repro` in a temporary git repository)."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from helpers import seg_params, tiny_params

PROJECT = Path(__file__).resolve().parent.parent


def sh(cwd, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture
def repo(tmp_path):
    for name in ("convheads", "pipeline"):
        shutil.copytree(PROJECT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "dvc.yaml", tmp_path)
    params = tiny_params(".")  # paths relative to the repository, as in the real params.yaml
    params["paths"] = {"data": "data/dataset", "outputs": "outputs"}
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    sh(tmp_path, "dvc", "init", "-q")
    return tmp_path


def ran(log):
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]


@pytest.mark.slow  # dvc repro in a temporary repository
def test_dvc_repro_runs_the_stages_and_reruns_only_what_changed(repo):
    first = ran(sh(repo, "dvc", "repro"))
    assert "pretrain" in first  # the photo testbed's backbone: a root of its own, in no fixed place
    assert [s for s in first if s != "pretrain"] == ["source", "data", "baseline", "score", "select", "replace",
                                                     "recover", "evaluate", "benchmark", "track"]
    assert (repo / "outputs/pretrain/backbone.pt").is_file()
    assert (repo / "dvc.lock").is_file() and (repo / "outputs/recover/model.pt").is_file()
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json"))
    metrics = next(iter(shown.values()))["data"]["outputs/evaluate/metrics.json"]["data"]
    assert 0 <= metrics["compressed"]["top1"] <= 1 and "speedup_b1" in \
        next(iter(shown.values()))["data"]["outputs/benchmark/benchmark.json"]["data"]

    assert ran(sh(repo, "dvc", "repro")) == ["source"]  # nothing changed: only the (cheap) source listing ran

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["recover"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro")) == ["source", "recover", "evaluate", "benchmark", "track"]

    runs = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db").get_experiment_by_name("convheads").experiment_id],
        "tags.runner = 'dvc'")
    assert len(runs) == 2 and {r.data.params["recover.lr"] for r in runs} == {"0.001", "0.002"}

    # the README's DVC form of a sweep: queued experiments with parameters set on the command line, run by
    # the queue's worker in a workspace of its own from the committed state, which restores what the
    # parameters do not reach (the baseline, the scores) from the cache and reruns from the stage that reads them
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "experiment")
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "replace.variant=drop", "-S", "select.fraction=0.5")
    log = sh(repo, "dvc", "exp", "run", "--run-all", "-j", "1")  # `dvc queue start`, waited for
    assert "Running stage 'select'" in log and "Running stage 'score'" not in log, log[-3000:]
    assert "Running stage 'baseline'" not in log, log[-3000:]
    table = pd.read_csv(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv", "--no-pager")))
    queued = table[table["replace.variant"] == "drop"]
    assert len(queued) == 1 and queued.State.iloc[0] == "Success", table.iloc[:, :8].to_string()
    assert 0 <= float(queued["compressed.top1"].iloc[0]) <= 1 and float(queued["select.fraction"].iloc[0]) == 0.5


CODE_ROOTS = ("convheads", "pipeline")


def test_dvc_yaml_lists_the_code_each_stage_runs():
    """dvc.yaml's code deps are what the Prefect flow fingerprints (pipeline.runner.stage_code)."""
    from pipeline.runner import stage_code

    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    modules = {name: f"pipeline.stages.{name}" for name in stages if name not in ("source", "track")}  # source: always
    modules["track"] = "pipeline.__main__"                                                             # runs
    for name, module in modules.items():
        listed = {d for d in stages[name]["deps"] if d.split("/")[0] in CODE_ROOTS}
        if name == "data":  # the data stage's deps are shaped with its data source: they must cover its code
            assert all(any(f == d or f.startswith(f"{d}/") for d in listed) for f in stage_code(module)), name
        else:
            assert listed == set(stage_code(module)), name
    baseline = stage_code("pipeline.stages.baseline")
    assert "pipeline/tracking.py" not in baseline and "convheads" in baseline
    assert "pipeline/stages/recover.py" not in baseline and "pipeline/stages/baseline.py" not in stage_code(
        "pipeline.stages.recover")  # a stage never imports another stage


def test_fingerprints_follow_a_stages_own_code_and_the_checkpoints_contents(finished_pipeline, tmp_path,
                                                                            monkeypatch):
    from pipeline import runner
    from pipeline.config import validate
    from pipeline.dag import STAGES

    code = tmp_path / "code"
    for name in CODE_ROOTS:
        shutil.copytree(PROJECT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner, "PROJECT", code)
    runner.stage_code.cache_clear()
    try:
        cfg = validate(tiny_params(finished_pipeline))
        fingerprints = lambda: {s: runner.fingerprint(STAGES[s], cfg) for s in ("baseline", "recover")}  # noqa: E731
        before = fingerprints()
        for edited in ("pipeline/tracking.py", "pipeline/registry.py", "pipeline/stages/baseline.py"):
            with open(code / edited, "a") as f:
                f.write("\n# edited\n")
        after_baseline = fingerprints()  # tracking and registry code retrain nothing; the baseline stage itself
        assert after_baseline["recover"] == before["recover"] and after_baseline["baseline"] != before["baseline"]
        with open(code / "pipeline/stages/recover.py", "a") as f:
            f.write("\n# edited\n")
        after = fingerprints()
        assert after["baseline"] == after_baseline["baseline"] and after["recover"] != before["recover"]
        with open(code / "convheads/layers.py", "a") as f:
            f.write("\n# edited\n")
        assert fingerprints()["baseline"] != after["baseline"]  # the method: everything reruns

        checkpoint = tmp_path / "start.pth"
        checkpoint.write_bytes(b"weights, version 1")
        with_checkpoint = validate({**tiny_params(finished_pipeline),
                                    "model": {**cfg.model.model_dump(), "checkpoint": str(checkpoint)}})
        first = runner.fingerprint(STAGES["baseline"], with_checkpoint)
        checkpoint.write_bytes(b"weights, version two")  # the same file, rewritten
        assert runner.fingerprint(STAGES["baseline"], with_checkpoint) != first
        checkpoint.write_bytes(b"weights, version 1")
        assert runner.fingerprint(STAGES["baseline"], with_checkpoint) == first
    finally:
        runner.stage_code.cache_clear()


@pytest.mark.slow  # dvc repro in a temporary repository
def test_dvc_reruns_the_data_stage_when_a_dvc_tracked_folder_changes(repo):
    """A folder the team tracks with `dvc add` is read in place; DVC's hash of it is recorded."""
    from PIL import Image
    for c in ("cat", "dog"):
        (repo / "images" / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (10, 10), (30 * i, 0, 99 if c == "cat" else 200)).save(repo / "images" / c / f"{i}.png")
    sh(repo, "dvc", "add", "-q", "images")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="folder", path="images", val_fraction=0.25, test_fraction=0.25)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro", "data")) == ["source", "data"]
    meta = json.loads((repo / "data/dataset/meta.json").read_text())
    assert meta["dvc"]["md5"] == yaml.safe_load((repo / "images.dvc").read_text())["outs"][0]["md5"]
    assert sorted(p.name for p in (repo / "data/dataset").iterdir()) == ["manifest.csv", "meta.json", "stage.json"]
    Image.new("RGB", (10, 10)).save(repo / "images/dog/new.png")
    assert ran(sh(repo, "dvc", "repro", "data")) == ["source", "data"]


@pytest.mark.slow  # dvc repro in a temporary repository
def test_dvc_repro_runs_the_segmentation_pipeline_and_shows_its_pictures(repo):
    params = seg_params(".")
    params["paths"] = {"data": "data/dataset", "outputs": "outputs"}
    params["tracking"]["tracking_uri"] = f"sqlite:///{repo}/mlflow.db"
    params["registry"].update(min_speedup=0.01, max_drop=1.0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert [s for s in ran(sh(repo, "dvc", "repro")) if s != "pretrain"][-1] == "track"
    shown = next(iter(json.loads(sh(repo, "dvc", "metrics", "show", "--json")).values()))["data"]
    metrics = shown["outputs/evaluate/metrics.json"]["data"]
    assert 0 <= metrics["compressed"]["miou"] <= 1 and "miou_drop" in metrics
    shown = json.loads(sh(repo, "dvc", "plots", "show", "--json"))
    assert not shown.get("errors"), shown["errors"]  # e.g. a plot naming a column only classification writes
    plots = shown["data"]
    assert plots["outputs/evaluate/predictions.png"] and plots["per-class IoU"]
    assert "val_headline" in json.dumps(plots["outputs/recover/history.csv"])
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    version = client.get_model_version(f"convheads-{params['model']['name']}-segmentation", "1")
    assert version.tags["promotion"] == "champion" and "miou" in version.tags
