"""Training over several processes with the real torchrun (gloo on the CPU): the same model as one
process, through the Prefect flow and after a kill -9; and the bad input of a distributed run."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import start_until_checkpoint, tiny_params

from convheads import ConvHeadsError
from flows.compress import main as compress_main
from pipeline.__main__ import main as pipeline_main
from pipeline.config import validate
from pipeline.dag import STAGES
from pipeline.launch import check
from pipeline.runner import execute, output_dir, read_record

PROJECT = Path(__file__).resolve().parent.parent


def weights(cfg, stage):
    return torch.load(output_dir(cfg, stage) / "model.pt", weights_only=False)["state_dict"]


def assert_same_weights(a, b, atol=1e-4):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < atol, worst


@pytest.mark.slow
def test_the_flow_with_two_processes_trains_the_models_of_one_process(prefect_api, _finished_pipeline, tmp_path,
                                                                     capfd):
    params = tiny_params(tmp_path)
    params["distributed"] = {"nproc_per_node": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert compress_main(["--params", str(tmp_path / "params.yaml")]) == 0
    out = capfd.readouterr()
    launched = "launching 2 of 2 processes on this machine: torchrun --nproc-per-node=2"
    assert (out.out + out.err).count(launched) == 2  # baseline and recover
    assert "Registered convheads-vit_tiny_patch16_224 version 1" in out.out
    assert "Traceback" not in out.out + out.err
    cfg, one = validate(params), validate(tiny_params(_finished_pipeline))  # the same, in one process
    for stage in ("baseline", "recover"):
        assert_same_weights(weights(cfg, stage), weights(one, stage))
        assert read_record(cfg, stage)["fingerprint"] == read_record(one, stage)["fingerprint"]
    assert not list(Path(cfg.paths.outputs).glob(".*.partial"))


@pytest.mark.slow
def test_dsp_through_the_flow_in_two_processes_learns_what_one_process_learns(prefect_api, finished_pipeline,
                                                                            tmp_path, capfd):
    params = tiny_params(finished_pipeline)  # data, baseline and scores are done: only the rest runs
    params["select"]["method"] = "dsp"
    params["recover"]["epochs"] = 2
    params["distributed"] = {"nproc_per_node": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert compress_main(["--params", str(tmp_path / "params.yaml")]) == 0
    out = capfd.readouterr()
    assert (out.out + out.err).count("launching 2 of 2 processes") == 1  # recover; the baseline is reused
    assert "Traceback" not in out.out + out.err and "Registered" in out.out
    two = validate(params)

    shutil.copytree(finished_pipeline / "outputs", tmp_path / "one/outputs")  # the same, in this process
    one = validate({**params, "distributed": {"nproc_per_node": 1},
                    "paths": {**params["paths"], "outputs": str(tmp_path / "one/outputs")}})
    for stage in ("select", "replace", "recover"):
        execute(STAGES[stage], one)
    learned = [json.loads((output_dir(c, "recover") / "selection.json").read_text()) for c in (one, two)]
    assert learned[0] == learned[1] and learned[0]["heads"]
    gates = [pd.read_csv(output_dir(c, "recover") / "gates.csv") for c in (one, two)]
    pd.testing.assert_frame_equal(gates[0], gates[1], atol=1e-4)
    assert_same_weights(weights(one, "recover"), weights(two, "recover"))


@pytest.mark.slow
def test_a_run_killed_in_one_process_resumes_in_two_and_equals_an_uninterrupted_one(_finished_pipeline, tmp_path):
    shutil.copytree(_finished_pipeline / "data", tmp_path / "data")  # the data stage, finished
    params = tiny_params(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    cfg = validate(params)
    command = ["run", "baseline", "--params", str(params_file)]
    first, checkpoints = start_until_checkpoint(command, cfg.paths.outputs, "baseline")
    os.kill(first.pid, signal.SIGKILL)
    output = first.communicate()[0]
    assert checkpoints(), output[-3000:]
    assert read_record(cfg, "baseline") is None  # nothing finished, nothing half-written in its place

    again = subprocess.run([sys.executable, "-m", "pipeline", *command, "distributed.nproc_per_node=2"], cwd=PROJECT,
                           env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 2 epochs done (written by 1 process, now 2)" in again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert not checkpoints()
    one = validate(tiny_params(_finished_pipeline))
    assert_same_weights(weights(cfg, "baseline"), weights(one, "baseline"))


def test_bad_distributed_input_fails_at_once_and_writes_nothing(tiny_config, tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    outputs = Path(tiny_config.paths.outputs)

    # fp16 on the CPU: before Prefect starts, and in the stage itself
    assert compress_main(["--params", str(params_file), "precision=fp16", "device=cpu"]) == 2
    assert "precision: precision fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert pipeline_main(["run", "baseline", "--params", str(params_file), "precision=fp16", "device=cpu"]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err

    # a global batch the processes cannot share
    assert pipeline_main(["run", "baseline", "--params", str(params_file), "distributed.nproc_per_node=2",
                       "baseline.batch_size=63"]) == 2
    assert "baseline.batch_size=63 (the global batch of one update) must be a multiple of" in capsys.readouterr().err

    # several machines without a rendezvous, a rank beyond them
    for distributed, message in (({"nnodes": 2}, "need distributed.rdzv_endpoint: node 0's host:port"),
                                 ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "node_rank must be below")):
        with pytest.raises(ConvHeadsError, match=message):
            validate({**tiny_config.model_dump(mode="json"), "distributed": distributed})

    # more processes than GPUs (this machine has none: the check is given the count)
    cuda = validate({**tiny_config.model_dump(mode="json"), "device": "cuda", "distributed": {"nproc_per_node": 4}})
    with pytest.raises(ConvHeadsError, match="nproc_per_node=4 but this machine has 2 GPUs"):
        check(cuda, gpus=2)

    # a rendezvous nobody answers: fails after rdzv_timeout, not torchrun's 10 minutes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    start = time.monotonic()
    assert pipeline_main(["run", "baseline", "--params", str(params_file), "distributed.nnodes=2",
                       "distributed.node_rank=1", f"distributed.rdzv_endpoint=127.0.0.1:{port}",
                       "distributed.rdzv_timeout=2"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"distributed.rdzv_endpoint 127.0.0.1:{port} cannot be reached from this machine" in err
    assert "start node 0" in err
    # node 0 must own the endpoint's address
    assert pipeline_main(["run", "baseline", "--params", str(params_file), "distributed.nnodes=2",
                       "distributed.rdzv_endpoint=192.0.2.1:29500"]) == 2
    assert "192.0.2.1 is not an address of this machine" in capsys.readouterr().err
    assert not outputs.exists() or not any(outputs.iterdir())
