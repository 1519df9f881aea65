"""Pretraining as a Prefect flow: a ViT pretrained by masked image modelling on photographs, the
checkpoint the compression pipeline starts from (model.checkpoint).

    python -m flows.pretrain                       # params.yaml's pretrain section (resumes a killed run)
    python -m flows.pretrain --ship                # ... and replace the embedded default's checkpoint
    python -m flows.pretrain pretrain.steps=500 pretrain.source=folder pretrain.path=my_images/

The stage and its locality measure are in pipeline/stages/pretrain.py; everything goes to one
MLflow run (the loss curve, locality.csv / locality.png, the backbone). --ship copies the backbone
to data/pretrained/ with a fingerprint that tests/test_pretrain.py checks against the code.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, Optional

import mlflow
from prefect import flow, task
from prefect.cache_policies import NONE

from convheads import ConvHeadsError
from flows import checked_config, exit_status, prefect_api, quiet_failure
from pipeline.config import PHOTOS_CHECKPOINT, PipelineConfig
from pipeline.dag import ALL_STAGES
from pipeline.lock import hold
from pipeline.runner import execute, output_dir
from pipeline.stages.pretrain import pretrain_code, ship, shipped_settings
from pipeline.tracking import check_reachable, log_stage, pipeline_run

SHIP_COMMAND = "python -m flows.pretrain --ship"


@task(cache_policy=NONE)
def pretrain_stage(config: PipelineConfig):
    return execute(ALL_STAGES["pretrain"], config)


@flow(name="pretrain")
@quiet_failure
def pretrain(config: PipelineConfig = PipelineConfig(), run_name: Optional[str] = None, ship_to: Optional[str] = None
             ) -> Dict:
    """Pretrain (or find the finished stage), log it to MLflow, and ship the backbone if asked."""
    check_reachable(config)
    with hold(config, "flow run pretrain"), pipeline_run(config, run_name, {"runner": "prefect", "flow": "pretrain"}
                                                          ) as run_id:
        outcome = pretrain_stage(config)
        log_stage(config, "pretrain", run_id, outcome.skipped)
        result = {**outcome.summary, "mlflow_run_id": run_id, "skipped": outcome.skipped,
                  "backbone": str(outcome.path / "backbone.pt")}
        if ship_to:
            record = {"command": SHIP_COMMAND, "code": pretrain_code(), "settings": shipped_settings(config)}
            result["shipped"] = str(ship(output_dir(config, "pretrain"), Path(ship_to), record))
            mlflow.set_tag("shipped_to", result["shipped"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    p.add_argument("--run-name", default=None, help="name of the MLflow run")
    p.add_argument("--ship", action="store_true", help=f"copy the backbone to {PHOTOS_CHECKPOINT}, the default's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    args = p.parse_args(argv)
    config = checked_config(args.params, args.overrides)
    if config is None:
        return 2
    try:
        check_reachable(config)
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with prefect_api():
        state = pretrain(config=config, run_name=args.run_name, ship_to=PHOTOS_CHECKPOINT if args.ship else None,
                         return_state=True)
    status = exit_status(state)
    if status == 0:
        r = state.result()
        print(f"\npretrained {config.model.name}: {r['steps']} updates, final loss {r['final_loss']:.4f}; "
              f"{r['local_heads']} of {r['heads']} heads put >= 50% of their attention inside 3 x 3 (uniform: "
              f"{r['uniform_share']:.0%}), the most local {r['local_share_max']:.0%}")
        print(f"backbone: {r['backbone']}" + (f", shipped to {r['shipped']}" if r.get("shipped") else ""))
        print(f"MLflow run {r['mlflow_run_id']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
