"""MLflow: one run per pipeline run, a nested run per stage, everything read from stage outputs.

Logging reads the files a stage wrote, so the Prefect flow (which logs each stage as it finishes)
and `python -m pipeline track` (the last DVC stage, which logs them all at the end) log the same
things. Registering the logged model is the registry's (registry.py), a step of its own. The parent
run holds the configuration as params, the tags (git commit, data version, config hash), the
headline metrics as `<stage>/<name>`, and both models (MLflow PyTorch models with signature and
input example).

Every logging step looks up what an earlier attempt already logged (a stage's nested run, a logged
model) before creating it, so a retried task never logs twice. A tracking server that is down fails
the run in seconds, with its address in the message, not after minutes of retries.
"""
import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterator, Optional

import mlflow
import pandas as pd
import requests
import torch
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from convheads import ConvHeadsError

from .artifacts import HEADLINE, HISTORY, MODEL_FILE, stage_model
from .config import PipelineConfig
from .dag import ALL_STAGES, STAGES
from .hashing import short_hash
from .loaders import loader
from .runner import PROJECT, STAGE_FILE, output_dir, read_record, up_to_date

FINGERPRINT_TAG = "pipeline_fingerprint"  # all stage fingerprints: equal means nothing changed

# Which stage's model is logged under which name on the parent run.
LOGGED_MODELS = {"baseline": "baseline_model", "recover": "compressed_model"}
DATA_FILES = ("manifest.csv", "meta.json", STAGE_FILE)  # the data stage: not every image
LOGGED_TAG = "logged"  # on a stage's nested run once everything of the stage is logged

# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes) and waits
# 120 s for an answer; a server that is down should fail a run in seconds. Settings of your own win.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def client_for(cfg: PipelineConfig) -> mlflow.MlflowClient:
    """A client of the configured store, with HTTP_SETTINGS (where not set already)."""
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)
    return mlflow.MlflowClient(tracking_uri(cfg))


def tracking_uri(cfg: PipelineConfig) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the project."""
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT / 'mlflow.db'}"


def check_reachable(cfg: PipelineConfig) -> None:
    """Fail in seconds, naming the server, if the tracking server does not answer (local stores always do)."""
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10)  # any answer will do: it is up
    except requests.RequestException as e:
        raise ConvHeadsError(unreachable(uri, e)) from None


def unreachable(uri: str, error: BaseException) -> str:
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    reason = found.group(1) if found else type(error).__name__
    return (f"the MLflow tracking server at {uri} is not reachable ({reason}). Start it, or point "
            f"MLFLOW_TRACKING_URI (or tracking.tracking_uri) at one that runs, then run the same command again: "
            f"finished stages are kept and not recomputed")


def setup(cfg: PipelineConfig) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    uri = tracking_uri(cfg)
    check_reachable(cfg)
    client_for(cfg)  # the HTTP settings
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside a local database, not in the working directory
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except MlflowException:  # another run created it just now
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(data: Dict, prefix: str = "", sep: str = ".") -> Dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def numeric(data: Dict, sep: str = "/") -> Dict[str, float]:
    return {k: float(v) for k, v in flatten(data, sep=sep).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "convheads", "pipeline", "flows"], cwd=PROJECT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_hash(cfg: PipelineConfig) -> str:
    return short_hash(cfg.model_dump(mode="json"))


@contextlib.contextmanager
def pipeline_run(cfg: PipelineConfig, run_name: Optional[str] = None, tags: Optional[Dict] = None) -> Iterator[str]:
    """Open the pipeline's MLflow run (FAILED if the body raises); yield its id."""
    experiment_id = setup(cfg)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    try:
        mlflow.set_tags({"git_commit": git_commit(), "config_hash": config_hash(cfg), **(tags or {})})
        resolved = cfg.model_dump(mode="json")
        mlflow.log_params(flatten(resolved))
        mlflow.log_text(yaml.safe_dump(resolved, sort_keys=False), "params.yaml")
        yield run.info.run_id
    except BaseException as e:
        # The tracking server may be what failed: marking the run must not hide the first error.
        with contextlib.suppress(Exception):
            mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()


def log_stage(cfg: PipelineConfig, stage: str, run_id: str, skipped: bool = False) -> None:
    """Log a finished stage's outputs: a nested run with its files, params, metrics and history;
    its headline numbers, tags and model on the pipeline run `run_id`. Safe to repeat: what an
    earlier attempt logged completely is not logged again."""
    record = read_record(cfg, stage)
    summary, folder = record["summary"], output_dir(cfg, stage)
    with _inside(run_id):
        parent = mlflow.active_run().info
        earlier = _stage_run(parent, stage)
        if earlier is None or earlier.data.tags.get(LOGGED_TAG) != "true":
            with mlflow.start_run(run_id=earlier.info.run_id if earlier else None, run_name=stage, nested=True,
                                  experiment_id=parent.experiment_id):
                mlflow.set_tags({"stage": stage, "skipped": str(skipped), "fingerprint": record["fingerprint"]})
                mlflow.log_params(flatten(cfg.section(*ALL_STAGES[stage].sections)))
                history = _history_rows(folder / HISTORY) if (folder / HISTORY).is_file() else []
                for row in history:  # per-epoch (pretrain: per-update) curves; their last values need no second copy
                    x = "epoch" if "epoch" in row else "step"
                    mlflow.log_metrics({k: v for k, v in row.items() if k != x}, step=int(row[x]))
                mlflow.log_metrics({k: v for k, v in numeric(summary).items() if not history or k not in history[0]})
                for f in sorted(folder.iterdir()):
                    if f.is_file() and f.name != MODEL_FILE and (stage != "data" or f.name in DATA_FILES):
                        mlflow.log_artifact(str(f))
                mlflow.set_tag(LOGGED_TAG, "true")
        mlflow.log_metrics({f"{stage}/{k}": v for k, v in numeric(summary).items()})
        if stage == "data":
            mlflow.set_tag("data_version", summary["data_version"])
            if summary.get("dvc"):  # a folder tracked by DVC: its hash there, and where it was imported from
                mlflow.set_tags({"data_dvc_md5": summary["dvc"]["md5"],
                                 **({"data_dvc_import": json.dumps(summary["dvc"]["import"])}
                                    if summary["dvc"].get("import") else {})})
        if stage in LOGGED_MODELS:
            log_model(cfg, stage, LOGGED_MODELS[stage])


def _stage_run(parent, stage: str) -> Optional[mlflow.entities.Run]:
    """The nested run of `stage` under the pipeline run `parent`, if an earlier attempt made one."""
    runs = mlflow.MlflowClient().search_runs(
        [parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}' AND tags.stage = '{stage}'")
    return runs[0] if runs else None


@contextlib.contextmanager
def _inside(run_id: str) -> Iterator[None]:
    """Make `run_id` the active run (it may already be, e.g. in the thread that opened it)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
    else:
        with mlflow.start_run(run_id=run_id):
            yield


def _history_rows(path: Path):
    """The per-epoch metrics (without the headline's copy, which is there for dvc plots)."""
    return pd.read_csv(path).drop(columns=HEADLINE, errors="ignore").to_dict("records")


def log_model(cfg: PipelineConfig, stage: str, name: str):
    """An MLflow PyTorch model (safe pt2 format) with signature and a real input example, on the
    active run; the one logged already if an earlier attempt logged it.

    The example holds two test images so the exported graph keeps a dynamic batch size."""
    run = mlflow.active_run().info
    earlier = logged_model(mlflow.MlflowClient(), run.experiment_id, run.run_id, name)
    if earlier is not None:
        return earlier
    model = stage_model(cfg, stage)
    test = loader(cfg, model, "test", batch_size=2).dataset  # two samples: no loader workers to start and stop
    images = torch.stack([test[i][0] for i in range(2)])
    logits = model(images).detach().numpy()
    example = images.numpy()
    return mlflow.pytorch.log_model(model, name=name, signature=infer_signature(example, logits),
                                    input_example=example, serialization_format="pt2")


def logged_model(client: mlflow.MlflowClient, experiment_id: str, run_id: str, name: str):
    """The model logged as `name` by run `run_id` and finished uploading, or None."""
    models = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}' AND name = '{name}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def last_run_with(cfg: PipelineConfig, pipeline_fingerprint: str) -> Optional[mlflow.entities.Run]:
    """The newest finished run that computed the pipeline with this fingerprint."""
    setup(cfg)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list", max_results=1,
                              filter_string=f"tags.{FINGERPRINT_TAG} = '{pipeline_fingerprint}' "
                                            f"AND attributes.status = 'FINISHED'", order_by=["start_time DESC"])
    return runs[0] if runs else None


def log_all(cfg: PipelineConfig, run_name: Optional[str] = None) -> str:
    """Log every finished stage to a new pipeline run (what DVC's last stage does); its id."""
    for stage in STAGES:
        if read_record(cfg, stage) is None:
            raise ConvHeadsError(f"stage {stage!r} has not finished; run dvc repro")
    with pipeline_run(cfg, run_name=run_name, tags={"runner": "dvc"}) as run_id:
        for stage in STAGES:
            log_stage(cfg, stage, run_id)
        mlflow.set_tag(FINGERPRINT_TAG, up_to_date(STAGES.values(), cfg))
    return run_id
