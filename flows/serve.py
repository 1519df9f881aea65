"""Serve the compression flow as a Prefect deployment on a cron schedule.

    python -m flows.serve                      # schedule and parameters from params.yaml; runs until stopped
    python -m flows.serve --params prod.yaml

While it runs, scheduled runs execute in this process (on this machine: run it on the GPU
machine), and `prefect deployment run 'compress/scheduled'` starts one on demand. A run in
which nothing changed (same data version, code and configuration) retrains nothing and records
that it skipped. See README.md for a Prefect server shared by a team.
"""
import argparse
import sys

from prefect import serve

from flows import check_schedule, checked_config
from flows.compress import compress
from pipeline.config import PipelineConfig


def deployment(config: PipelineConfig):
    """The compression flow's deployment: cron schedule and parameters from the configuration."""
    return compress.to_deployment(
        name=config.schedule.deployment, schedule=check_schedule(config.schedule),
        parameters={"config": config.model_dump(mode="json")},
        description="convheads compression pipeline on a schedule (parameters from params.yaml)",
        tags=["convheads"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    config = checked_config(args.params, args.overrides)
    if config is None:
        return 2
    serve(deployment(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
