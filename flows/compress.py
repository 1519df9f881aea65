"""The compression pipeline as a Prefect flow: data to a registered, compressed model.

    python -m flows.compress                          # params.yaml
    python -m flows.compress recover.epochs=5 select.granularity=block select.count=2
    python -m flows.compress --params other.yaml --force

data -> baseline fine-tuning -> head scoring -> selection -> replacement -> recovery
fine-tuning -> evaluation -> benchmarking -> registry (challenger; champion if the gate passes).
Finished stages whose inputs did not change are skipped. When nothing changed at all and the last
run that computed the same thing finished and is registered (with the same registry settings),
the run retrains and registers nothing and records what it found; when only the tracking or the
registration is missing, it does that, without retraining. Everything goes to one MLflow run.
A run holds the project's outputs and data folders: a second run on them fails at once.
"""
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import mlflow
import yaml
from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.runtime import flow_run

from convheads import ConvHeadsError
from flows import checked_config, exit_status, parse_command_line, prefect_api, quiet_failure
from pipeline import preflight
from pipeline.config import PipelineConfig
from pipeline.dag import STAGES
from pipeline.launch import TRAINING_STAGES, launch, world_size
from pipeline.lock import hold
from pipeline.registry import PROMOTION_WAIT, SETTINGS_TAG, local_store, register, registered_version, settings_hash
from pipeline.runner import Outcome, execute, fingerprint, output_dir, read_record, up_to_date
from pipeline.summary import QUALITY, summary, summary_table
from pipeline.tracking import (
    FINGERPRINT_TAG,
    check_reachable,
    config_hash,
    last_run_with,
    log_stage,
    pipeline_run,
    tracking_uri,
)

# Only the data stage can fail transiently (downloads); training failures are not worth a retry.
RETRIES = {"data": 2}
# Against a tracking server, registrations from every machine take turns on this Prefect global
# concurrency limit (on the Prefect server they share); a local store has a file lock instead.
PROMOTION_LIMIT = "convheads-promotion"


def transient(task, task_run, state) -> bool:
    """Whether a failed stage is worth a retry: not when its input is bad (a ConvHeadsError)."""
    try:
        state.result()
    except ConvHeadsError:
        return False
    except Exception:  # noqa: BLE001 -- anything else (a download, a full disk) may pass next time
        return True
    return True


@task(cache_policy=NONE)  # stages skip themselves by fingerprint; Prefect need not cache results
def run_stage(name: str, cfg: PipelineConfig) -> Outcome:
    if name in TRAINING_STAGES and world_size(cfg) > 1:
        return launched_stage(name, cfg)
    return execute(STAGES[name], cfg)


def launched_stage(name: str, cfg: PipelineConfig) -> Outcome:
    """A training stage over several processes: the stage's command line under torchrun, as DVC
    runs it (`python -m pipeline run NAME`), with this run's whole configuration as its params file."""
    stage = STAGES[name]
    record = read_record(cfg, name)
    if record is not None and record["fingerprint"] == fingerprint(stage, cfg):
        return Outcome(name, output_dir(cfg, name), record["summary"], record["fingerprint"], True, 0.0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        status = launch(cfg, ["run", name, "--params", str(params)])
    record = read_record(cfg, name)
    if status != 0 or record is None:
        raise (ConvHeadsError if status == 2 else RuntimeError)(
            f"stage {name} failed in its torchrun processes (exit status {status}); their output says why")
    return Outcome(name, output_dir(cfg, name), record["summary"], record["fingerprint"], False,
                   time.perf_counter() - start)


# A hiccup is retried: log_stage never logs twice.
@task(cache_policy=NONE, retries=2, retry_delay_seconds=3, retry_condition_fn=transient)
def track_stage(cfg: PipelineConfig, name: str, run_id: str, skipped: bool) -> None:
    try:
        log_stage(cfg, name, run_id, skipped=skipped)
    except Exception:
        check_reachable(cfg)  # a server that went away: say so, with its address
        raise


def stage_task(name: str):
    return run_stage.with_options(name=name, task_run_name=name, retries=RETRIES.get(name, 0),
                                  retry_delay_seconds=10, retry_condition_fn=transient)


# Idempotent: a retry reuses the version it registered.
@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def register_task(config: PipelineConfig, run_id: str) -> Dict:
    if local_store(tracking_uri(config)) is not None:
        return register(config, run_id)  # the file lock beside the store serialises promotions
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=PROMOTION_LIMIT, limit=1))
        except ObjectAlreadyExists:
            pass
    return register(config, run_id,
                    serialise=concurrency(PROMOTION_LIMIT, occupy=1, timeout_seconds=PROMOTION_WAIT, strict=True))


@flow(name="compress")
@quiet_failure
def compress(config: PipelineConfig = PipelineConfig(), run_name: Optional[str] = None, force: bool = False) -> Dict:
    """Run every stage, log to MLflow, register; return the headline numbers and what happened."""
    logger = get_run_logger()
    preflight.check(config)  # also here: deployments pass parameters without main()
    check_reachable(config)  # a tracking server that is down fails the run now, not after training
    with hold(config, f"flow run {flow_run.get_name()!r}"):
        result = _pipeline(config, run_name, force, logger)
    registry = result.get("registry")
    metric, label = QUALITY[config.task][0]
    registered = (f"; {registry['model_name']} version {registry['version']}: {registry['promotion']}"
                  if registry else "")
    logger.info("compressed %s %.2f%% (baseline %.2f%%)%s%s", label, 100 * result[f"compressed_{metric}"],
                100 * result[f"baseline_{metric}"], registered, f"; {result['reason']}" if result.get("reason") else "")
    return result


def _pipeline(config: PipelineConfig, run_name: Optional[str], force: bool, logger) -> Dict:
    tags = {"runner": "prefect", "prefect_flow_run_id": str(flow_run.get_id())}
    unchanged = None if force else up_to_date(STAGES.values(), config)
    if unchanged:
        previous = last_run_with(config, unchanged)
        if previous is None:
            logger.info("every stage is up to date, but no finished MLflow run with pipeline fingerprint %s is in "
                        "experiment %r at %s (the last attempt failed, or logged elsewhere): logging and registering "
                        "now, without retraining", unchanged, config.tracking.experiment, tracking_uri(config))
        else:
            return _nothing_to_compute(config, run_name, tags, previous, logger)
    with pipeline_run(config, run_name, tags) as run_id:
        for name in STAGES:
            outcome = stage_task(name)(name, config)
            track_stage.with_options(task_run_name=f"track-{name}")(config, name, run_id, outcome.skipped)
        mlflow.set_tag(FINGERPRINT_TAG, up_to_date(STAGES.values(), config))
        result = {**summary(config), "mlflow_run_id": run_id, "skipped": False}
        mlflow.log_text(summary_table(result) + "\n", "summary.txt")
        if config.registry.enabled:
            result["registry"] = register_task(config, run_id)
    return result


def _nothing_to_compute(config: PipelineConfig, run_name: Optional[str], tags: Dict, previous, logger) -> Dict:
    """Every stage is up to date and `previous` finished logging them: skip, or only register again."""
    found = (f"run {previous.info.run_id} (finished {_when(previous.info.end_time)}) computed the same thing "
             f"(data version {read_record(config, 'data')['summary']['data_version'][:12]}, configuration "
             f"{config_hash(config)}, pipeline fingerprint {previous.data.tags[FINGERPRINT_TAG]})")
    version = registered_version(config, previous) if config.registry.enabled else None
    registry = None
    if not config.registry.enabled or version is not None:
        reason = (f"nothing changed since {found}"
                  + (f" and is registered as {config.registered_model_name} version {version.version} "
                     f"({version.tags.get('promotion', 'no decision')})" if version is not None else "")
                  + ": not retrained, not registered (--force logs and registers anyway)")
    else:
        tag = previous.data.tags.get(SETTINGS_TAG)
        missing = ("it was never registered" if tag is None else
                   "the registry settings (model name or gate) changed since" if tag != settings_hash(config) else
                   f"its version of {config.registered_model_name} is gone from the registry")
        reason = f"nothing to compute: {found}, but {missing}: registering its model now, without retraining"
        logger.info(reason)
        registry = register_task(config, previous.info.run_id)
    with pipeline_run(config, run_name, {**tags, "skipped": "true", "skip_reason": reason,
                                         "computed_by": previous.info.run_id}) as run_id:
        pass
    result = {**summary(config), "mlflow_run_id": run_id, "skipped": True, "reason": reason}
    if registry is not None:
        result["registry"] = registry
    return result


def _when(ms: Optional[int]) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms else "unknown"


def closing_lines(result: Dict, config: PipelineConfig) -> str:
    """What the command line prints at the end: the table, what happened and where it is recorded."""
    lines = [f"\n{summary_table(result)}\n"]
    if result.get("reason"):
        lines.append(result["reason"][0].upper() + result["reason"][1:])
    registry = result.get("registry")
    if registry:
        lines.append(f"Registered {registry['model_name']} version {registry['version']}: {registry['promotion']} "
                     f"({'; '.join(registry['reasons'])})")
    uri = tracking_uri(config)
    lines.append(f"MLflow run {result['mlflow_run_id']} in experiment {config.tracking.experiment!r} at {uri}")
    lines.append(f"Browse it: mlflow ui --backend-store-uri {uri}\n" if local_store(uri) else f"Browse it: {uri}\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_command_line("python -m flows.compress", __doc__, argv, force=True)
    config = checked_config(args.params, args.overrides)
    if config is None:
        return 2
    with contextlib.ExitStack() as stack:
        try:  # a tracking server that is down or a busy folder: one line, before Prefect starts (the flow
            check_reachable(config)  # checks again, for deployments, and holds on to the folders taken here)
            stack.enter_context(hold(config, "python -m flows.compress"))
        except ConvHeadsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with prefect_api():
            state = compress(config=config, run_name=args.run_name, force=args.force, return_state=True)
    status = exit_status(state)
    if status == 0:
        print(closing_lines(state.result(), config))
    return status


if __name__ == "__main__":
    sys.exit(main())
