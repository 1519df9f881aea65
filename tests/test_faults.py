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
import pandas as pd
import requests
import torch
import yaml

from convheads import create_model, load_model, save_model
from convheads.training import train
from flows.compress import main as compress_main
from tasks.config import validate
from tasks.pipeline import STAGES
from tasks.runner import execute, output_dir, read_record
from conftest import start_until_checkpoint, tiny_params

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


def test_kill_9_during_recovery_then_the_same_command_resumes_and_a_second_run_is_refused(
        prefect_api, _finished_pipeline, tmp_path, capsys):
    params = copy_of(_finished_pipeline, tmp_path / "project", recover={"epochs": 3})
    cfg, params_file = validate(params), tmp_path / "project/params.yaml"
    reference = validate(copy_of(_finished_pipeline, tmp_path / "reference", recover={"epochs": 3}))
    for name in ("recover", "evaluate"):  # the same stages, never interrupted
        execute(STAGES[name], reference)

    first, checkpoints = start_until_checkpoint(["run", "recover", "--params", str(params_file)], cfg.paths.outputs,
                                                "recover", poll=0.05)
    command = [sys.executable, "-m", "tasks", "run", "recover", "--params", str(params_file)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    assert checkpoints(), first.communicate()[0][-3000:]  # it finished an epoch and is training the next
    os.kill(first.pid, signal.SIGSTOP)  # hold it there while another run tries the same folder
    try:
        # a scheduled run firing now: refused at once, naming the run that holds the folder
        assert compress_main(["--params", str(params_file)]) == 2
        error = capsys.readouterr().err
        assert f"is in use by python -m tasks run recover (pid {first.pid} on {socket.gethostname()}" in error
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


def test_a_tracking_server_that_is_down_fails_the_run_in_seconds_and_the_same_command_recovers(
        prefect_api, _finished_pipeline, tmp_path, capsys, monkeypatch):
    root = tmp_path / "project"
    params = copy_of(_finished_pipeline, root, tracking={"tracking_uri": None},
                     registry={"min_speedup": 0.01, "max_top1_drop": 1.0})
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
from convheads.training import train

model_file, checkpoint = sys.argv[1:]
model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                     num_classes=3)
batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
# Writes beyond 16 KiB fail with EFBIG (a full disk fails with ENOSPC the same way); the signal
# that would kill the process instead is ignored, as a full disk sends none.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
for attempt in (lambda: save_model(model, model_file),
                lambda: train(model, batches, epochs=2, checkpoint=checkpoint, progress=False)):
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
    train(model, [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))], epochs=1, checkpoint=checkpoint,
          progress=False)
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
