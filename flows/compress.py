"""The compression pipeline of METHOD.md as a Prefect flow.

    python -m flows.compress                          # params.yaml
    python -m flows.compress recover.epochs=5 select.granularity=block select.count=2
    python -m flows.compress --params other.yaml --force

data -> baseline fine-tuning -> head scoring -> selection -> replacement -> recovery
fine-tuning -> evaluation -> benchmarking -> registry (challenger; champion if the gate passes).
Finished stages whose inputs did not change are skipped; when nothing at all changed (same data
version, code and configuration as the last finished run) nothing is retrained or registered
and the run records that it skipped and why. Everything goes to one MLflow run.
"""
import argparse
import sys
from typing import Dict, Optional

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from convheads import ConvHeadsError
from flows import checked_config, exit_status
from tasks import preflight
from tasks.config import PipelineConfig
from tasks.registry import register
from tasks.report import summary, table
from tasks.pipeline import STAGES
from tasks.runner import Outcome, code_version, execute, up_to_date
from tasks.tracking import FINGERPRINT_TAG, config_hash, last_run_with, log_stage, pipeline_run, tracking_uri

# Only the data stage can fail transiently (downloads); training failures are not worth a retry.
RETRIES = {"data": 2}


@task(cache_policy=NONE)  # stages skip themselves by fingerprint; Prefect need not cache results
def run_stage(name: str, cfg: PipelineConfig) -> Outcome:
    return execute(STAGES[name], cfg)


@task(cache_policy=NONE, retries=3, retry_delay_seconds=5)  # a tracking server may hiccup
def track_stage(cfg: PipelineConfig, name: str, run_id: str, skipped: bool) -> None:
    log_stage(cfg, name, run_id, skipped=skipped)


def transient(task, task_run, state) -> bool:
    """Whether a failed stage is worth a retry: not when its input is bad (a ConvHeadsError)."""
    try:
        state.result()
    except ConvHeadsError:
        return False
    except Exception:  # noqa: BLE001 -- anything else (a download, a full disk) may pass next time
        return True
    return True


def stage_task(name: str):
    return run_stage.with_options(name=name, task_run_name=name, retries=RETRIES.get(name, 0),
                                  retry_delay_seconds=10, retry_condition_fn=transient)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)  # idempotent: a retry reuses the version
def register_task(config: PipelineConfig, run_id: str) -> Dict:
    return register(config, run_id)


@flow(name="compress")
def compress(config: PipelineConfig = PipelineConfig(), run_name: Optional[str] = None, force: bool = False) -> Dict:
    """Run every stage, log to MLflow, register; return the headline numbers and what happened."""
    logger = get_run_logger()
    preflight.check(config)  # also here: deployments pass parameters without main()
    tags = {"runner": "prefect", "prefect_flow_run_id": str(flow_run.get_id())}
    unchanged = None if force else up_to_date(STAGES.values(), config)
    if unchanged:
        previous = last_run_with(config, unchanged)
        reason = (f"nothing changed since {'run ' + previous.info.run_id if previous else 'the last finished run'}"
                  f" (same data version, code {code_version()} and configuration {config_hash(config)}): "
                  f"not retrained, not registered")
        with pipeline_run(config, run_name, {**tags, "skipped": "true", "skip_reason": reason}) as run_id:
            pass
        logger.info(reason)
        result = {**summary(config), "mlflow_run_id": run_id, "skipped": True, "reason": reason}
        print(f"\n{reason}\n\n{table(result)}\n")
        return result
    with pipeline_run(config, run_name, tags) as run_id:
        for name in STAGES:
            outcome = stage_task(name)(name, config)
            track_stage.with_options(task_run_name=f"track-{name}")(config, name, run_id, outcome.skipped)
        mlflow.set_tag(FINGERPRINT_TAG, up_to_date(STAGES.values(), config))
        result = {**summary(config), "mlflow_run_id": run_id, "skipped": False}
        mlflow.log_text(table(result) + "\n", "summary.txt")
        if config.registry.enabled:
            result["registry"] = register_task(config, run_id)
    registry = result.get("registry")
    print(f"\n{table(result)}\n")
    if registry:
        print(f"Registered {registry['model_name']} version {registry['version']}: {registry['promotion']} "
              f"({'; '.join(registry['reasons'])})")
    print(f"MLflow run {run_id} in experiment {config.tracking.experiment!r} at {tracking_uri(config)}\n"
          f"Browse it: mlflow ui --backend-store-uri {tracking_uri(config)}\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    p.add_argument("--run-name", default=None, help="name of the MLflow run")
    p.add_argument("--force", action="store_true", help="log and register even if nothing changed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    args = p.parse_args(argv)
    config = checked_config(args.params, args.overrides)
    if config is None:
        return 2
    return exit_status(compress(config=config, run_name=args.run_name, force=args.force, return_state=True))


if __name__ == "__main__":
    sys.exit(main())
