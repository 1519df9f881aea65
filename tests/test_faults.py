"""What survives what, with the real components: a kill -9 during training, two runs on one
folder, a tracking server that is down, a full disk."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import requests
import torch
import yaml
from helpers import seg_params, start_until_checkpoint, tiny_params
from PIL import Image

from convheads import create_model, load_model, save_model
from convheads.engine.training import TrainSettings, train
from flows.compress import main as compress_main
from pipeline.config import validate
from pipeline.dag import STAGES
from pipeline.runner import execute, output_dir, read_record

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def copy_of(finished, root: Path, **changes) -> dict:
    """tiny_params for a copy of the finished tiny pipeline under `root`, with section updates."""
    for part in ("data", "outputs"):
        shutil.copytree(finished / part, root / part)
    params = tiny_params(root)
    for section, values in changes.items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def stage_files(cfg) -> dict:
    """Every finished stage's record and when it was written: a rerun would change them."""
    return {name: (output_dir(cfg, name) / "stage.json").stat().st_mtime_ns for name in STAGES}


@pytest.mark.slow
def test_kill_9_during_recovery_then_the_same_command_resumes_and_a_second_run_is_refused(
        prefect_api, _finished_pipeline, tmp_path, capsys):
    params = copy_of(_finished_pipeline, tmp_path / "project", recover={"epochs": 3})
    cfg, params_file = validate(params), tmp_path / "project/params.yaml"
    reference = validate(copy_of(_finished_pipeline, tmp_path / "reference", recover={"epochs": 3}))
    for name in ("recover", "evaluate"):  # the same stages, never interrupted
        execute(STAGES[name], reference)

    first, checkpoints = start_until_checkpoint(["run", "recover", "--params", str(params_file)], cfg.paths.outputs,
                                                "recover", poll=0.05)
    command = [sys.executable, "-m", "pipeline", "run", "recover", "--params", str(params_file)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    assert checkpoints(), first.communicate()[0][-3000:]  # it finished an epoch and is training the next
    os.kill(first.pid, signal.SIGSTOP)  # hold it there while another run tries the same folder
    try:
        # a scheduled run firing now: refused at once, naming the run that holds the folder
        assert compress_main(["--params", str(params_file)]) == 2
        error = capsys.readouterr().err
        assert f"is in use by python -m pipeline run recover (pid {first.pid} on {socket.gethostname()}" in error
        assert "paths.outputs=" in error
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert read_record(cfg, "recover")["summary"]["epochs"] == 1  # the last finished outputs are untouched

    again = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "of 3 epochs done" in again.stdout + again.stderr  # it resumed from the killed run's checkpoint
    assert not checkpoints()
    execute(STAGES["evaluate"], cfg)
    assert read_record(cfg, "evaluate")["summary"] == read_record(reference, "evaluate")["summary"]
    timing = ["train_seconds", "train_images_per_sec"]  # how fast, not what was learnt
    pd.testing.assert_frame_equal(pd.read_csv(output_dir(cfg, "recover") / "history.csv").drop(columns=timing),
                                  pd.read_csv(output_dir(reference, "recover") / "history.csv").drop(columns=timing))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_tracking_server_that_is_down_fails_the_run_in_seconds_and_the_same_command_recovers(
        prefect_api, _finished_pipeline, tmp_path, capsys, monkeypatch):
    root = tmp_path / "project"
    params = copy_of(_finished_pipeline, root, tracking={"tracking_uri": None},
                     registry={"min_speedup": 0.01, "max_drop": 1.0})
    cfg, params_file = validate(params), str(root / "params.yaml")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    finished = stage_files(cfg)

    start = time.monotonic()
    assert compress_main(["--params", params_file]) == 2
    seconds = time.monotonic() - start
    assert f"the MLflow tracking server at {uri} is not reachable (Connection refused)" in capsys.readouterr().err
    assert seconds < 60, f"{seconds:.0f} s: MLflow's own retries (minutes) were not cut short"
    assert stage_files(cfg) == finished

    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "mlartifacts")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, "mlflow server exited"
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        # the same command, the server back; as a user runs it, with Prefect's temporary server
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        proc = subprocess.run([sys.executable, "-m", "flows.compress", "--params", params_file], cwd=PROJECT,
                              env={**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(PROJECT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-5000:]
        assert stage_files(cfg) == finished  # nothing retrained
        # it ends with its summary: nothing after it (the temporary server stopping, its log worker)
        lines = proc.stdout.rstrip().splitlines()
        assert lines[-1] == f"Browse it: {uri}" and any("test top-1" in line for line in lines[-12:]), lines[-12:]
        assert "Traceback" not in proc.stdout and not [line for line in lines if "| ERROR" in line]
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("convheads").experiment_id
        parent, = client.search_runs([experiment], "tags.runner = 'prefect'")
        nested = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert parent.info.status == "FINISHED" and {r.data.tags["skipped"] for r in nested} == {"True"}
        assert len(nested) == len(STAGES)
        version, = client.search_model_versions("name = 'convheads-vit_tiny_patch16_224'")
        assert version.run_id == parent.info.run_id and version.tags["promotion"] == "champion"
    finally:
        server.terminate()
        server.wait(timeout=60)


DISK_FULL = """
import resource, signal, sys
import torch
from convheads import ConvHeadsError, create_model, save_model
from convheads.engine.training import TrainSettings, train

model_file, checkpoint = sys.argv[1:]
model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                     num_classes=3)
batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
# Writes beyond 16 KiB fail with EFBIG (a full disk fails with ENOSPC the same way); the signal
# that would kill the process instead is ignored, as a full disk sends none.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
for attempt in (lambda: save_model(model, model_file),
                lambda: train(model, batches, TrainSettings(epochs=2), checkpoint=checkpoint, progress=False)):
    try:
        attempt()
    except ConvHeadsError as e:
        print(e)
"""


def test_a_full_disk_keeps_the_previous_model_and_checkpoint_and_says_what_happened(tmp_path):
    model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                         num_classes=3)
    model_file, checkpoint = tmp_path / "model.pt", tmp_path / "resume.pt"
    save_model(model, model_file)
    x = torch.randn(2, 3, 16, 16)
    saved = model.eval()(x).detach()
    train(model, [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))], TrainSettings(epochs=1),
          checkpoint=checkpoint, progress=False)
    before = model_file.read_bytes(), checkpoint.read_bytes()

    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(model_file), str(checkpoint)], cwd=PROJECT,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = proc.stdout.strip().splitlines()
    assert len(messages) == 2, proc.stdout + proc.stderr[-3000:]
    for message, path in zip(messages, (model_file, checkpoint)):
        assert message.startswith(f"could not write {path}: File too large (the disk is full, or a file size")
        assert "the previous file is unchanged" in message
    assert (model_file.read_bytes(), checkpoint.read_bytes()) == before
    torch.testing.assert_close(load_model(model_file)(x), saved)
    assert len(torch.load(checkpoint, weights_only=False)["history"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half-written leftovers


def temporary_servers(port: int):
    """The processes serving Prefect's temporary API on `port` (uvicorn, started by a flow's command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "uvicorn" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == str(port):
            found.append(p)
    return found


@pytest.mark.slow
def test_kill_9_of_a_flow_command_ends_its_temporary_prefect_server(_finished_pipeline, tmp_path):
    copy_of(_finished_pipeline, tmp_path / "project", recover={"epochs": 50})  # long enough to be killed in
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(PROJECT))
    flow = subprocess.Popen([sys.executable, "-m", "flows.compress", "--params", str(tmp_path / "project/params.yaml")],
                            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = None
    for line in flow.stdout:  # "Starting temporary server on http://127.0.0.1:PORT", then the run's own log
        if "Starting temporary server on" in line:
            port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
        if port is not None and "train_loss" in line:  # recovery is under way: the flow is mid-run
            break
    assert port is not None and temporary_servers(port), "no temporary server seen"
    os.kill(flow.pid, signal.SIGKILL)
    flow.wait()
    deadline = time.monotonic() + 30
    while temporary_servers(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not temporary_servers(port), "the temporary Prefect server outlived the command that started it"


def mismatched_segmentation_folder(root: Path) -> Path:
    """An ADE20K-style folder whose one mask is smaller than its image: found only when the data stage reads it."""
    rng = np.random.default_rng(0)
    for split, count in (("training", 6), ("validation", 3)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / f"images/{split}/img_{i}.png")
            size = 48 if (split, i) == ("training", 5) else 64
            Image.fromarray(rng.integers(0, 3, (size, size), dtype=np.uint8)).save(
                root / f"annotations/{split}/img_{i}.png")
    return root


@pytest.mark.slow
def test_bad_input_found_inside_a_stage_ends_the_flow_with_one_clear_line(tmp_path):
    folder = mismatched_segmentation_folder(tmp_path / "ade")
    params = seg_params(tmp_path, image_size=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(PROJECT))
    proc = subprocess.run([sys.executable, "-m", "flows.compress", "--params", str(tmp_path / "params.yaml"),
                           "task=segmentation", "data.source=folder", f"data.path={folder}"], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "NoneType: None" not in output, output[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: 1 image/mask pair(s) are not usable: {folder}/annotations/training/img_5.png: mask is "
                      f"48 x 48 but its image images/training/img_5.png is 64 x 64 (width x height); a mask must "
                      f"have its image's size"], proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]  # the last word is the fix
