"""Command line for single stages (what dvc.yaml runs) and for logging a finished pipeline.

    python -m tasks run STAGE [--params params.yaml] [--force] [key=value ...]
    python -m tasks track [--params params.yaml] [key=value ...]   # all stage outputs -> one MLflow run
    python -m tasks listing FILE [--params params.yaml] [key=value ...]   # the data source's listing -> FILE

Stages: data, baseline, score, select, replace, recover, evaluate, benchmark.
"""
import argparse
import sys
from pathlib import Path

from convheads import ConvHeadsError

from . import preflight
from .config import load_config
from .data import write_listing
from .lock import hold
from .runner import execute
from .pipeline import STAGES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "track", "listing"])
    p.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    p.add_argument("--force", action="store_true", help="run: rerun even if the stage's inputs did not change")
    args, rest = p.parse_known_args(argv)
    stage = rest.pop(0) if args.command in ("run", "listing") and rest else None
    if args.command == "run" and stage not in STAGES:
        p.error(f"run needs a stage name, one of: {', '.join(STAGES)}")
    if args.command == "listing" and not stage:
        p.error("listing needs the file to write")
    try:
        cfg = load_config(args.params, rest)
        if args.command == "run" and stage == "data":  # the first stage: check the whole configuration before any work
            preflight.check(cfg)
        if args.command == "listing":  # DVC's view of a folder source (dvc.yaml: stage source)
            write_listing(cfg, Path(stage))
            return 0
        with hold(cfg, f"python -m tasks {args.command}" + (f" {stage}" if stage else "")):
            if stage:
                outcome = execute(STAGES[stage], cfg, force=args.force)
                done = "up to date" if outcome.skipped else f"done in {outcome.seconds:.1f} s"
                print(f"{stage}: {done} -> {outcome.path}")
            else:
                from .tracking import track_outputs
                print(f"logged to MLflow run {track_outputs(cfg)}")
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
