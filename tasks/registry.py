"""The MLflow model registry: register each run's compressed model, gate the champion alias.

Every registered version gets the alias `challenger`; `champion` moves to it only when the
promotion gate passes (accuracy drop, speedup, better than the current champion on the same
test data). The decision and its reasons go to the run and to the version's tags. Everything
here uses the MlflowClient API, so it works against any tracking server.
"""
import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import mlflow
from mlflow.exceptions import MlflowException

from convheads import ConvHeadsError
from convheads.evaluation import evaluate

from .config import PipelineConfig
from .inputs import loader, stage_model
from .runner import read_record
from .tracking import LOGGED_MODELS, git_commit, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reasons: List[str]


def gate(top1: float, top1_drop: float, speedup: float, champion_top1: Optional[float],
         cfg: PipelineConfig) -> Decision:
    """Whether a candidate may become champion, with a reason for every check."""
    r = cfg.registry
    checks = [
        (top1_drop <= r.max_top1_drop,
         f"top-1 drop {top1_drop * 100:.2f} pts {'<=' if top1_drop <= r.max_top1_drop else '>'} "
         f"max {r.max_top1_drop * 100:.2f} pts"),
        (speedup >= r.min_speedup,
         f"speedup {speedup:.3f}x (batch {cfg.gate_batch_size}) {'>=' if speedup >= r.min_speedup else '<'} "
         f"min {r.min_speedup:.3f}x"),
    ]
    if champion_top1 is None:
        checks.append((True, "no current champion"))
    elif r.must_beat_champion:
        checks.append((top1 > champion_top1, f"top-1 {top1:.4f} {'>' if top1 > champion_top1 else '<='} "
                                             f"champion's {champion_top1:.4f} on the same test data"))
    return Decision(all(ok for ok, _ in checks), [reason for _, reason in checks])


def client_for(cfg: PipelineConfig) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri(cfg))


def version_by_alias(client: mlflow.MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_top1(client, name: str, data_version: str, cfg: PipelineConfig):
    """The champion's test top-1 on this run's test data: recorded if it was measured on the same
    data version, else measured now. None when there is no champion."""
    champion = version_by_alias(client, name, CHAMPION)
    if champion is None:
        return None, None
    if champion.tags.get("data_version") == data_version and "top1" in champion.tags:
        return champion, float(champion.tags["top1"])
    mlflow.set_tracking_uri(tracking_uri(cfg))
    model = mlflow.pytorch.load_model(f"models:/{name}/{champion.version}")
    reference = stage_model(cfg, "recover")  # the pipeline's own model: input size and normalisation
    return champion, evaluate(model, loader(cfg, reference, "test", cfg.evaluate.batch_size))["top1"]


def register(cfg: PipelineConfig, run_id: str) -> Dict:
    """Register the compressed model logged in `run_id` as a new version and apply the gate."""
    client, name = client_for(cfg), cfg.registered_model_name
    run = client.get_run(run_id)
    logged = client.search_logged_models(
        [run.info.experiment_id], f"source_run_id = '{run_id}' AND name = '{LOGGED_MODELS['recover']}'")
    if not logged:
        raise ConvHeadsError(f"run {run_id} has no logged {LOGGED_MODELS['recover']} to register")
    ev, bench = read_record(cfg, "evaluate")["summary"], read_record(cfg, "benchmark")["summary"]
    data_version = read_record(cfg, "data")["summary"]["data_version"]
    top1, drop = ev["compressed"]["top1"], ev["top1_drop"]
    speedup = bench[f"speedup_b{cfg.gate_batch_size}"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"{cfg.model.name} with attention heads replaced by "
                                                         f"depthwise convolutions (convheads)")
    # A retried task must not register the same run twice.
    existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    version = existing[0] if existing else client.create_model_version(
        name, source=logged[0].model_uri, run_id=run_id, model_id=logged[0].model_id,
        tags={"base_model": cfg.model.name, "heads_replaced": str(read_record(cfg, "select")["summary"]["heads_replaced"]),
              "data_version": data_version, "top1": f"{top1:.6f}", "top1_drop": f"{drop:.6f}",
              "speedup": f"{speedup:.4f}", "git_commit": git_commit()})
    champion, champion_top1 = _champion_top1(client, name, data_version, cfg)
    if champion is not None and str(champion.version) == str(version.version):
        champion_top1 = None  # re-registering the champion's own run: nothing to beat
    decision = gate(top1, drop, speedup, champion_top1, cfg)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    outcome = CHAMPION if decision.promoted else "rejected"
    client.set_model_version_tag(name, version.version, "promotion", outcome)
    client.set_model_version_tag(name, version.version, "promotion_reasons", "; ".join(decision.reasons))
    result = {"model_name": name, "version": int(version.version), "promotion": outcome,
              "previous_champion": int(champion.version) if champion else None, **asdict(decision)}
    client.set_tag(run_id, "registry_version", f"{name}/{version.version}")
    client.set_tag(run_id, "promotion", outcome)
    client.log_text(run_id, json.dumps(result, indent=2), "promotion.json")
    return result


def resolve_version(client: mlflow.MlflowClient, name: str, version: str):
    """A version of registered model `name`, from "3" or "models:/<name>/3", with clear errors."""
    _require_model(client, name)
    text = str(version)
    if text.startswith("models:/"):
        owner, _, text = text[len("models:/"):].rpartition("/")
        if owner != name:
            raise ConvHeadsError(f"{version} is a version of model {owner!r}, not of {name!r}")
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ConvHeadsError(f"model {name!r} has no versions yet; run the pipeline to register one")
    match = [v for v in versions if str(v.version) == text]
    if not match:
        raise ConvHeadsError(f"model {name!r} has no version {text!r}; versions: "
                             f"{', '.join(sorted((str(v.version) for v in versions), key=int))}")
    return match[0]


def _require_model(client: mlflow.MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = [m.name for m in client.search_registered_models()]
        raise ConvHeadsError(f"no registered model {name!r}" + (f"; known: {', '.join(known)}" if known
                                                                 else "; the registry is empty")) from None


def set_champion(client: mlflow.MlflowClient, name: str, version: str, reason: str = "manual") -> Dict:
    """Move `champion` to a version by hand (promotion or rollback); checks first, then changes."""
    target = resolve_version(client, name, version)
    previous = version_by_alias(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, target.version)
    client.set_model_version_tag(name, target.version, "promotion", f"{CHAMPION} ({reason})")
    return {"model_name": name, "version": int(target.version),
            "previous_champion": int(previous.version) if previous else None}


def load_champion(cfg: PipelineConfig):
    """The current champion as a PyTorch module."""
    client, name = client_for(cfg), cfg.registered_model_name
    _require_model(client, name)
    if version_by_alias(client, name, CHAMPION) is None:
        raise ConvHeadsError(f"model {name!r} has no {CHAMPION} yet; run the pipeline or promote a version")
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}")
