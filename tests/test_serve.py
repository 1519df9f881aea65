"""The team setup with Prefect's own tools: a real `prefect server start`, the deployment served by
`python -m flows.serve`, listed and run on demand with the `prefect` command line."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests
import yaml
from helpers import tiny_params

from pipeline.config import validate

pytestmark = pytest.mark.slow  # a Prefect server and its CLI

PROJECT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_cli_lists_and_runs_the_served_deployment_on_a_real_server(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONPATH": str(PROJECT)}
    params = tiny_params(tmp_path)
    params["schedule"] = {"deployment": "nightly-test", "cron": "30 2 * * 1", "timezone": "Europe/Paris"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def prefect(*args: str) -> str:
        proc = subprocess.run([PREFECT, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "serve")}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                              env=env, stdout=logs["server"], stderr=subprocess.STDOUT)
    serve = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{api}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        assert "<html" in requests.get(f"http://127.0.0.1:{port}/", timeout=10).text  # the UI is served too

        serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--params", str(tmp_path / "params.yaml")],
                                 cwd=PROJECT, env=env, stdout=logs["serve"], stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while requests.get(f"{api}/deployments/name/compress/nightly-test", timeout=10).status_code != 200:
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert "nightly-test" in prefect("deployment", "ls")  # 422 with a fastapi the server disagrees with
        prefect("work-pool", "ls")
        deployment = json.loads(prefect("deployment", "inspect", "compress/nightly-test", "-o", "json"))
        schedule = deployment["schedules"][0]["schedule"]
        assert (schedule["cron"], schedule["timezone"]) == ("30 2 * * 1", "Europe/Paris")
        assert validate(deployment["parameters"]["config"]) == validate(params)

        out = prefect("deployment", "run", "compress/nightly-test", "--watch", "--watch-timeout", "600")
        assert "Completed" in out, (tmp_path / "serve.log").read_text()[-5000:]
        runs = json.loads(prefect("flow-run", "ls", "-o", "json"))
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        assert (tmp_path / "outputs/benchmark/benchmark.json").is_file()
        client = mlflow.MlflowClient(params["tracking"]["tracking_uri"])
        tracked = client.search_runs([client.get_experiment_by_name("convheads").experiment_id])
        assert [r.data.tags["prefect_flow_run_id"] for r in tracked if "prefect_flow_run_id" in r.data.tags] == \
            [runs[0]["id"]]
    finally:
        for proc in (serve, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
        for log in logs.values():
            log.close()
