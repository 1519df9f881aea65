"""Move the `champion` alias by hand: promote a version, or roll back to an earlier one.

    python -m flows.promote 3                          # champion -> version 3 of the configured model
    python -m flows.promote models:/convheads-vit_tiny_patch16_224/2 --reason "rollback: bad canary"
    python -m flows.promote 3 --model-name my-model --tracking-uri http://mlflow:5000

The version must exist and belong to the model; nothing changes when a check fails.
"""
import argparse
import sys
from typing import Dict, Optional

from prefect import flow, get_run_logger

from flows import exit_status, prefect_api, quiet_failure
from pipeline.config import load_config
from pipeline.registry import set_champion
from pipeline.tracking import check_reachable, client_for


@flow(name="promote")
@quiet_failure
def promote(version: str, model_name: Optional[str] = None, tracking_uri: Optional[str] = None,
            reason: str = "manual", params_file: str = "params.yaml") -> Dict:
    """Point `champion` at `version` ("3" or "models:/<name>/3") of `model_name` (default: from params)."""
    overrides = [f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else []
    config = load_config(params_file, overrides)
    check_reachable(config)
    name = model_name or config.registered_model_name
    result = set_champion(client_for(config), name, version, reason=reason)
    get_run_logger().info("%s: champion is now version %s (was %s)", name, result["version"],
                          result["previous_champion"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.promote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("version", help='a version number, or "models:/<name>/<version>"')
    p.add_argument("--model-name", default=None, help="registered model (default: registry.model_name in params)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: as the pipeline)")
    p.add_argument("--reason", default="manual", help="recorded on the version's promotion tag")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    with prefect_api():
        state = promote(args.version, args.model_name, args.tracking_uri, args.reason, args.params, return_state=True)
    if state.is_failed():
        return exit_status(state)
    result = state.result()
    print(f"{result['model_name']}: champion -> version {result['version']} (was {result['previous_champion']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
