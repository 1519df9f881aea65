"""The compression pipeline of METHOD.md as a Prefect flow.

    python -m flows.compress                          # params.yaml
    python -m flows.compress recover.epochs=5 select.granularity=block select.count=2
    python -m flows.compress --params other.yaml

data -> baseline fine-tuning -> head scoring -> selection -> replacement -> recovery
fine-tuning -> evaluation -> benchmarking. Finished stages whose inputs did not change are
skipped; everything goes to one MLflow run (a nested run per stage).
"""
import argparse
import sys
from typing import Dict, Optional

import mlflow
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from convheads import ConvHeadsError
from tasks import preflight
from tasks.config import PipelineConfig, load_config
from tasks.report import summary, table
from tasks.stages import STAGES
from tasks.steps import stage_task, track_stage
from tasks.tracking import pipeline_run, tracking_uri


@flow(name="compress")
def compress(config: PipelineConfig = PipelineConfig(), run_name: Optional[str] = None) -> Dict:
    """Run every stage, log to MLflow, return the headline numbers (with the MLflow run id)."""
    logger = get_run_logger()
    preflight.check(config)  # also here: deployments pass parameters without main()
    tags = {"runner": "prefect", "prefect_flow_run_id": str(flow_run.get_id())}
    with pipeline_run(config, run_name=run_name or flow_run.get_name(), tags=tags) as run_id:
        skipped = []
        for name in STAGES:
            outcome = stage_task(name)(name, config)
            track_stage.with_options(task_run_name=f"track-{name}")(config, name, run_id, outcome.skipped)
            if outcome.skipped:
                skipped.append(name)
        result = {**summary(config), "mlflow_run_id": run_id, "skipped_stages": skipped}
        mlflow.log_text(table(result) + "\n", "summary.txt")
    logger.info("stages up to date (skipped): %s", ", ".join(skipped) or "none")
    print(f"\n{table(result)}\n\nMLflow run {run_id} in experiment {config.tracking.experiment!r} at "
          f"{tracking_uri(config)}\nBrowse it: mlflow ui --backend-store-uri {tracking_uri(config)}\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    p.add_argument("--run-name", default=None, help="name of the MLflow run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    args = p.parse_args(argv)
    try:
        config = load_config(args.params, args.overrides)
        preflight.check(config)  # fail in seconds, before the Prefect server starts
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = compress(config=config, run_name=args.run_name, return_state=True)
    if state.is_failed():
        try:
            state.result()
        except ConvHeadsError as e:
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
