"""The MLflow model registry: register each run's compressed model, gate the champion alias.

Every registered version gets the alias `challenger`; `champion` moves to it only when the promotion
gate passes (drop of the task's headline metric, test top-1 or mIoU; speedup; better than the
current champion on the same test data, at full precision). The decision and its reasons go to the
run and to the version's tags. Everything here uses the MlflowClient API, so it works against any
tracking server.

Promotion is compare-and-set: reading the champion, measuring it and moving the alias happen under
one lock, so of two runs registering at once the second compares with the first's result. For a
local store (SQLite file, mlruns folder) the lock is a file beside it; against a tracking server the
caller passes its own (the Prefect flow: a global concurrency limit on its server).
"""
import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ContextManager, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from convheads import ConvHeadsError, vit_info

from .artifacts import stage_model
from .config import PipelineConfig
from .hashing import short_hash
from .loaders import loader
from .lock import exclusive, lock_file
from .problems import data_config, problem
from .runner import read_record
from .summary import selection_summary
from .tracking import LOGGED_MODELS, client_for, git_commit, logged_model, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
SETTINGS_TAG = "registry_settings"  # on a registered run: the settings its registration was decided with
PROMOTION_WAIT = 600  # seconds a registration waits for another one on the same store


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reasons: List[str]


def gate(score: float, drop: float, speedup: float, champion_score: Optional[float],
         cfg: PipelineConfig, incomparable: Optional[str] = None) -> Decision:
    """Whether a candidate may become champion, with a reason for every check. `score` is the task's
    headline metric (top-1, or mIoU for segmentation) and `drop` its drop vs the run's baseline.
    `incomparable` says why the current champion cannot be compared with the candidate (then it does
    not pass)."""
    r = cfg.registry
    label, max_drop = problem(cfg).label, r.max_drop
    checks = [
        (drop <= max_drop,
         f"{label} drop {drop * 100:.2f} pts {'<=' if drop <= max_drop else '>'} max {max_drop * 100:.2f} pts"),
        (speedup >= r.min_speedup,
         f"speedup {speedup:.3f}x (batch {cfg.gate_batch_size}) {'>=' if speedup >= r.min_speedup else '<'} "
         f"min {r.min_speedup:.3f}x"),
    ]
    if incomparable:
        checks.append((False, incomparable))
    elif champion_score is None:
        checks.append((True, "no current champion"))
    elif r.must_beat_champion:
        checks.append(_beats(score, champion_score, r.min_improvement, label))
    return Decision(all(ok for ok, _ in checks), [reason for _, reason in checks])


def _beats(score: float, champion_score: float, min_improvement: float, label: str) -> Tuple[bool, str]:
    """Strictly better than the champion, by at least `min_improvement`: a rerun of the same thing never wins."""
    gain = score - champion_score
    ok = gain > 0 and gain >= min_improvement
    ours, theirs = _distinct(score, champion_score)
    if not min_improvement:
        return ok, f"{label} {ours} {'>' if ok else '<='} champion's {theirs} on the same test data"
    return ok, (f"{label} {ours} vs champion's {theirs} on the same test data: {gain * 100:+.2f} pts "
                f"{'>=' if ok else '<'} min improvement {min_improvement * 100:.2f} pts")


def _distinct(a: float, b: float) -> Tuple[str, str]:
    """Both numbers with 4 decimals, or as many more as it takes to show that they differ."""
    for digits in (4, 6, 8, 12):
        x, y = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if x != y or a == b:
            return x, y
    return repr(a), repr(b)


def version_by_alias(client: mlflow.MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def settings_hash(cfg: PipelineConfig) -> str:
    """What a registration was decided with: the model name and the gate."""
    return short_hash({"model_name": cfg.registered_model_name, **cfg.registry.model_dump(mode="json")})


def architecture(cfg: PipelineConfig) -> str:
    """What a model must share with the champion to be compared on the same test data: its shape,
    input and classes (not which heads were replaced: that is what competes)."""
    model = stage_model(cfg, "recover")
    info = vit_info(model)
    dc = data_config(cfg, model)
    mean, std = (tuple(round(float(v), 4) for v in dc[k]) for k in ("mean", "std"))
    head = f"segmentation head on blocks {model.feature_blocks}, " if cfg.task == "segmentation" else ""
    return (f"{head}{info.depth} blocks, width {info.num_heads * info.head_dim} ({info.num_heads} heads), patch "
            f"{'x'.join(map(str, info.patch_size))}, input {'x'.join(map(str, info.img_size))}, "
            f"{info.num_prefix_tokens} prefix tokens, {model.num_classes} classes, mean {mean}, std {std}")


def local_store(uri: str) -> Optional[Path]:
    """The file or folder of a local tracking store (sqlite:///..., file:..., a path); None for a server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(unquote(parsed.path)[1:])  # sqlite:///relative.db, sqlite:////absolute.db
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


@contextlib.contextmanager
def promotion_lock(cfg: PipelineConfig, holder: str):
    """One registration at a time on a local store (a file lock beside it). For a tracking server
    this holds nothing: pass register() a lock all runs share (flows.compress does)."""
    store = local_store(tracking_uri(cfg))
    if store is None:
        yield
        return
    try:
        with exclusive(lock_file(store), holder, wait=PROMOTION_WAIT):
            yield
    except TimeoutError as e:
        raise ConvHeadsError(f"the registry at {tracking_uri(cfg)} has been busy for {PROMOTION_WAIT} s with the "
                             f"registration of {e}; run again when it is done") from None


def _champion_score(client, name: str, champion, data_version: str, cfg: PipelineConfig) -> float:
    """The champion's headline metric (test top-1 or mIoU) on this run's test data, at full
    precision: as its run measured it if on the same data version, else measured now."""
    metric = problem(cfg).headline
    if champion.tags.get("data_version") == data_version:
        value = client.get_run(champion.run_id).data.metrics.get(f"evaluate/compressed/{metric}")
        if value is not None:
            return value
        if metric in champion.tags:
            return float(champion.tags[metric])
    return evaluate_version(cfg, name, champion.version)


def evaluate_version(cfg: PipelineConfig, name: str, version) -> float:
    """The headline metric of a registered version on this run's test split, whatever format it was
    logged in (MLflow's generic pyfunc interface: a pt2 model loads back as an exported program)."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    reference = stage_model(cfg, "recover")  # the pipeline's own model: input size and normalisation

    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(model.predict(images.numpy())))

    task = problem(cfg)
    return task.evaluate(predict, loader(cfg, reference, "test", cfg.evaluate.batch_size), progress=False,
                         device="cpu", precision="fp32")[task.headline]


def register(cfg: PipelineConfig, run_id: str, serialise: Optional[ContextManager] = None) -> Dict:
    """Register the compressed model logged in `run_id` as a new version and apply the gate.

    `serialise`: a lock shared by every run that registers to this tracking server (default: the
    local store's file lock, or nothing for a server)."""
    client, name = client_for(cfg), cfg.registered_model_name
    run = client.get_run(run_id)
    logged = logged_model(client, run.info.experiment_id, run_id, LOGGED_MODELS["recover"])
    if logged is None:
        raise ConvHeadsError(f"run {run_id} has no logged {LOGGED_MODELS['recover']} to register")
    ev, bench = read_record(cfg, "evaluate")["summary"], read_record(cfg, "benchmark")["summary"]
    data_version = read_record(cfg, "data")["summary"]["data_version"]
    metric = problem(cfg).headline
    score, drop = ev["compressed"][metric], ev[f"{metric}_drop"]
    speedup = bench[f"speedup_b{cfg.gate_batch_size}"]
    ours = architecture(cfg)
    with serialise or promotion_lock(cfg, f"run {run_id}"):
        try:
            client.get_registered_model(name)
        except MlflowException:
            with contextlib.suppress(MlflowException):  # another run may create it at the same moment
                client.create_registered_model(name, description=f"{cfg.model.name} with attention heads replaced "
                                                                 f"by depthwise convolutions (convheads)")
        # A retried task must not register the same run twice.
        existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
        version = existing[0] if existing else client.create_model_version(
            name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id,
            tags={"base_model": cfg.model.name,
                  "heads_replaced": str(selection_summary(cfg)["heads_replaced"]),
                  "data_version": data_version, metric: repr(score), f"{metric}_drop": f"{drop:.6f}",
                  "speedup": f"{speedup:.4f}", "architecture": ours, "git_commit": git_commit()})
        # Read the champion only now, inside the lock: it may have moved while this run trained.
        champion = version_by_alias(client, name, CHAMPION)
        champion_score = incomparable = None
        if champion is not None and str(champion.version) != str(version.version):  # not the champion's own run
            theirs = champion.tags.get("architecture")
            if theirs is not None and theirs != ours:
                incomparable = (f"not compared with champion version {champion.version}: a different architecture "
                                f"({theirs}) from this model ({ours}); register each architecture under its "
                                f"own registry.model_name, or promote by hand")
            else:
                champion_score = _champion_score(client, name, champion, data_version, cfg)
        decision = gate(score, drop, speedup, champion_score, cfg, incomparable)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        if decision.promoted:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    outcome = CHAMPION if decision.promoted else "rejected"
    client.set_model_version_tag(name, version.version, "promotion", outcome)
    client.set_model_version_tag(name, version.version, "promotion_reasons", "; ".join(decision.reasons))
    result = {"model_name": name, "version": int(version.version), "promotion": outcome,
              "previous_champion": int(champion.version) if champion else None, f"champion_{metric}": champion_score,
              **asdict(decision)}
    client.set_tag(run_id, "registry_version", f"{name}/{version.version}")
    client.set_tag(run_id, "promotion", outcome)
    client.set_tag(run_id, SETTINGS_TAG, settings_hash(cfg))
    client.log_text(run_id, json.dumps(result, indent=2), "promotion.json")
    return result


def registered_version(cfg: PipelineConfig, run: mlflow.entities.Run):
    """The version registered from `run` with the current registry settings, if it still exists."""
    if run.data.tags.get(SETTINGS_TAG) != settings_hash(cfg):
        return None
    versions = client_for(cfg).search_model_versions(f"name = '{cfg.registered_model_name}' "
                                                     f"AND run_id = '{run.info.run_id}'")
    return versions[0] if versions else None


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
