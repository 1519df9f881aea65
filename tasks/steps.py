"""The stages as Prefect tasks: run a stage (skipped when up to date), then log it to MLflow."""
from prefect import task
from prefect.cache_policies import NONE

from .config import PipelineConfig
from .stage import Outcome, execute
from .stages import STAGES
from .tracking import log_stage

# Only the data stage can fail transiently (downloads); training failures are not worth a retry.
RETRIES = {"data": 2}


@task(cache_policy=NONE)  # stages skip themselves by fingerprint; Prefect need not cache results
def run_stage(name: str, cfg: PipelineConfig) -> Outcome:
    return execute(STAGES[name], cfg)


@task(cache_policy=NONE, retries=3, retry_delay_seconds=5)  # a tracking server may hiccup
def track_stage(cfg: PipelineConfig, name: str, run_id: str, skipped: bool) -> None:
    log_stage(cfg, name, run_id, skipped=skipped)


def stage_task(name: str):
    return run_stage.with_options(name=name, task_run_name=name, retries=RETRIES.get(name, 0),
                                  retry_delay_seconds=10)
