"""The MLflow model registry: register each run's compressed model, gate the champion alias.

Every registered version gets the alias `challenger`; `champion` moves to it only when the promotion
gate passes (drop of the task's headline metric, test top-1 or mIoU; speedup; better than the
current champion on the same test data, at full precision). The drop and the speedup are the
deployed model's: in the deployment runtime, the first benchmarked; where that is onnxruntime-int8,
the INT8 model's drop (the evaluate stage's `compressed_int8`) and speedup. The decision and its reasons go to the
run and to the version's tags. Every version also gets a model card (`model_card`): what the model
is, its headline metric with its interval, its speedup in the deployment runtime, the selection, the
data version, the baseline run and the command that reproduces it, as the version's description
(what the MLflow UI shows) and as the run's `model_card.md`. Everything here uses the MlflowClient
API, so it works against any tracking server.

Promotion is compare-and-set: reading the champion, measuring it and moving the alias happen under
one lock, so of two runs registering at once the second compares with the first's result. For a
local store (SQLite file, mlruns folder) the lock is a file beside it; against a tracking server the
caller passes its own (the Prefect flow: a global concurrency limit on its server).
"""
import contextlib
import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ContextManager, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from convheads import ConvHeadsError, vit_info
from convheads.engine.timing import INT8_RUNTIME

from .artifacts import INT8_MODEL, stage_model
from .config import PipelineConfig
from .hashing import short_hash
from .loaders import loader
from .lock import exclusive, lock_file
from .params_file import overrides
from .problems import data_config, problem
from .runner import read_record
from .summary import binomial_interval, selection_summary
from .tracking import LOGGED_MODELS, client_for, git_commit, logged_model, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
SETTINGS_TAG = "registry_settings"  # on a registered run: the settings its registration was decided with
MODEL_CARD = "model_card.md"
# what a replaced head became, per replace.variant, in the model card's words
REPLACED_BY = {
    "depthwise": "replaced by depthwise {k} x {k} convolutions that keep the heads' W_V and W_O",
    "depthwise_global": "replaced by depthwise {k} x {k} convolutions plus a global term, keeping the heads' W_V "
                        "and W_O",
    "identity": "replaced, a block at a time, by one linear map (W_O W_V)",
    "ensemble": "merged, a block at a time, into one depthwise {k} x {k} convolution head",
    "fixed": "replaced by their fixed mean attention matrices",
    "drop": "removed",
}
PROMOTION_WAIT = 600  # seconds a registration waits for another one on the same store


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reasons: List[str]


def gate(score: float, drop: float, speedup: float, champion_score: Optional[float],
         cfg: PipelineConfig, incomparable: Optional[str] = None, int8: bool = False) -> Decision:
    """Whether a candidate may become champion, with a reason for every check. `score` is the task's
    headline metric (top-1, or mIoU for segmentation) at full precision, compared with the champion's;
    `drop` the deployed model's drop vs the run's baseline (`int8`: the INT8 model's).
    `incomparable` says why the current champion cannot be compared with the candidate (then it does
    not pass)."""
    r = cfg.registry
    label, max_drop = problem(cfg).label, r.max_drop
    checks = [
        (drop <= max_drop,
         f"{'INT8 ' if int8 else ''}{label} drop {drop * 100:.2f} pts {'<=' if drop <= max_drop else '>'} "
         f"max {max_drop * 100:.2f} pts"),
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


def deployed(ev: Dict, bench: Dict, metric: str) -> Tuple[str, float, float]:
    """The model the gate and the card judge, as the evaluate stage names it (the INT8 one where the
    benchmark's deployment runtime is onnxruntime-int8), its `metric` and that metric's drop vs the baseline."""
    if bench["runtime"] != INT8_RUNTIME:
        return "compressed", ev["compressed"][metric], ev[f"{metric}_drop"]
    if INT8_MODEL not in ev:
        raise ConvHeadsError("the benchmark deploys in onnxruntime-int8 but the evaluate stage has no INT8 metrics "
                             "(it ran without onnxruntime-int8 in benchmark.runtimes); rerun the pipeline")
    return INT8_MODEL, ev[INT8_MODEL][metric], ev["baseline"][metric] - ev[INT8_MODEL][metric]


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
    # the champion is compared at full precision; the drop and speedup are the deployed model's
    score = ev["compressed"][metric]
    model, deployed_score, drop = deployed(ev, bench, metric)
    int8 = model == INT8_MODEL
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
                  "speedup": f"{speedup:.4f}", "runtime": bench["runtime"], "architecture": ours,
                  "git_commit": git_commit(), **({f"{metric}_int8": repr(deployed_score)} if int8 else {})})
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
        decision = gate(score, drop, speedup, champion_score, cfg, incomparable, int8)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        if decision.promoted:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    outcome = CHAMPION if decision.promoted else "rejected"
    client.set_model_version_tag(name, version.version, "promotion", outcome)
    client.set_model_version_tag(name, version.version, "promotion_reasons", "; ".join(decision.reasons))
    result = {"model_name": name, "version": int(version.version), "promotion": outcome,
              "previous_champion": int(champion.version) if champion else None, f"champion_{metric}": champion_score,
              **asdict(decision)}
    card = model_card(cfg, client, run_id, name, version.version, outcome, decision.reasons)
    client.update_model_version(name, version.version, description=card)
    client.log_text(run_id, card, MODEL_CARD)
    client.set_tag(run_id, "registry_version", f"{name}/{version.version}")
    client.set_tag(run_id, "promotion", outcome)
    client.set_tag(run_id, SETTINGS_TAG, settings_hash(cfg))
    client.log_text(run_id, json.dumps(result, indent=2), "promotion.json")
    return result


def model_card(cfg: PipelineConfig, client: mlflow.MlflowClient, run_id: str, name: str, version,
               promotion: str, reasons: List[str]) -> str:
    """What a teammate reads about a registered version (markdown): what the model is, how good and
    how fast it is, what was replaced, on which data, from which baseline, and how to make it again.
    Every number is read from the run's stage records, so the card and the run agree."""
    task = problem(cfg)
    ev, bench = read_record(cfg, "evaluate")["summary"], read_record(cfg, "benchmark")["summary"]
    data = read_record(cfg, "data")["summary"]
    sel, metric, label = selection_summary(cfg), task.headline, task.label
    model, score, drop = deployed(ev, bench, metric)
    n = ev["num_images"]
    if metric == "top1":
        low, high = binomial_interval(round(score * n), n)
        interval = f"95% interval {low:.2%} to {high:.2%} (exact binomial, {n:,} test images)"
    else:  # mIoU is not a proportion of independent trials: no binomial interval exists
        interval = f"{n:,} test images; mIoU has no binomial interval: compare runs over several seeds"
    b = cfg.gate_batch_size
    speed = [f"{bench[f'speedup_b{bs}']:.3f}x at batch {bs}" for bs in cfg.benchmark.batch_sizes]
    blocks = sel["whole_blocks"]
    chosen = f"whole blocks {', '.join(map(str, blocks))}" if blocks else "heads scattered over blocks"
    run = client.get_run(run_id)
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' "
                                                          f"AND tags.stage = 'baseline'", max_results=1)
    baseline_run = f"nested run `{nested[0].info.run_id}` (stage baseline)" if nested else "its baseline stage"
    commit = run.data.tags.get("git_commit") or git_commit()
    command = " ".join(["python -m flows.compress", *(shlex.quote(o) for o in overrides(cfg))])
    weights = ("timm's pretrained weights" if cfg.model.pretrained else
               f"the checkpoint `{cfg.model.checkpoint}`" if cfg.model.checkpoint else "trained from scratch")
    source = cfg.data.source + (f" (`{cfg.data.path}`)" if cfg.data.path else "")
    r = cfg.replace
    became = REPLACED_BY.get(r.variant, "replaced").format(k=r.kernel_size)
    lines = [
        f"# {name} version {version}",
        "",
        f"`{cfg.model.name}` ({weights}) for {cfg.task}, with {sel['heads_replaced']} of {sel['heads_total']} "
        f"attention heads {became} (`replace.variant={r.variant}`, init `{r.init}`), then fine-tuned to recover "
        f"({cfg.recover.epochs} epochs). "
        f"Architecture: {architecture(cfg)}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| test {label} | **{score:.2%}**; {interval} |",
        *([f"| INT8 | the {label} above is the INT8 model's ({ev['int8_quantization']} quantization, onnxruntime); "
           f"float32: {ev['compressed'][metric]:.2%} |"] if model == INT8_MODEL else []),
        f"| baseline {label} | {ev['baseline'][metric]:.2%} (drop {drop * 100:+.2f} pts; "
        f"{ev['replaced'][metric]:.2%} right after replacement, before recovery) |",
        f"| speedup | **{bench[f'speedup_b{b}']:.3f}x** at batch {b} in {bench['runtime']}, the deployment runtime "
        f"({', '.join(speed)}; {bench['threads']} threads on {bench['device']}) |",
        f"| size | {bench['compressed_params']:,} parameters ({bench['params_ratio'] - 1:+.1%}), "
        f"{bench['compressed_gmacs']:.4g} GMACs per image ({bench['macs_ratio'] - 1:+.1%}) |",
        f"| selection | {chosen}, chosen by `{sel.get('method')}` ({cfg.select.granularity} granularity) |",
        f"| data | `{cfg.data.source}` data version `{data['data_version']}` ({source}) |",
        f"| baseline run | {baseline_run} of MLflow run `{run_id}`, logged as `{LOGGED_MODELS['baseline']}` |",
        f"| code | git commit `{commit}` |",
        f"| promotion | {promotion}: {'; '.join(reasons)} |",
        "",
        "Reproduce it (the run's whole configuration is also its `params.yaml` artifact: "
        "`python -m flows.compress --params params.yaml`):",
        "",
        "```bash",
        f"git checkout {commit.removesuffix('-dirty')}",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


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
