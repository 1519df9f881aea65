"""Command line for single stages (what dvc.yaml runs) and for logging a finished pipeline.

    python -m tasks run STAGE [--params params.yaml] [--force] [key=value ...]
    python -m tasks track [--params params.yaml] [key=value ...]   # all stage outputs -> one MLflow run
    python -m tasks listing FILE [--params params.yaml] [key=value ...]   # the data source's listing -> FILE

Stages: data, baseline, score, select, replace, recover, evaluate, benchmark. The training
stages (baseline, recover) launch themselves under torchrun when `distributed` asks for more than
one process (tasks.launch): this same command line, once per process.
"""
import argparse
import sys
from pathlib import Path

from convheads import ConvHeadsError, distributed
from convheads.precision import resolve_device

from . import preflight
from .config import load_config
from .data import write_listing
from .launch import TRAINING_STAGES, launch, world_size
from .lock import held_by_launcher, hold
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
        elif args.command == "run":
            preflight.check_devices(cfg)
        if args.command == "listing":  # DVC's view of a folder source (dvc.yaml: stage source)
            write_listing(cfg, Path(stage))
            return 0
        if distributed.launched():  # a torchrun worker: the launcher holds the folders (or rank 0 does)
            return _worker(cfg, stage, args.force)
        launched = stage in TRAINING_STAGES and world_size(cfg) > 1
        if launched and cfg.distributed.node_rank > 0:  # node 0's run holds the (shared) folders
            return launch(cfg, argv if argv is not None else sys.argv[1:])
        with hold(cfg, f"python -m tasks {args.command}" + (f" {stage}" if stage else "")):
            if launched:
                return launch(cfg, argv if argv is not None else sys.argv[1:])
            if stage:
                _report(execute(STAGES[stage], cfg, force=args.force))
            else:
                from .tracking import track_outputs
                print(f"logged to MLflow run {track_outputs(cfg)}")
    except ConvHeadsError as e:
        if distributed.is_main():  # every process meets the same bad input: one says so
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _worker(cfg, stage, force: bool) -> int:
    """One of torchrun's processes: join the group, run the stage together (rank 0 writes)."""
    if stage not in TRAINING_STAGES:
        raise ConvHeadsError(f"only the training stages ({', '.join(TRAINING_STAGES)}) run under torchrun; "
                             f"run {stage} as python -m tasks run {stage}")
    distributed.setup(distributed.local_device(resolve_device(cfg.device)))
    try:
        with held_by_launcher(cfg, f"python -m tasks run {stage} (torchrun)"):
            outcome = execute(STAGES[stage], cfg, force=force)
        if distributed.is_main():
            _report(outcome)
    finally:
        distributed.teardown()
    return 0


def _report(outcome) -> None:
    done = "up to date" if outcome.skipped else f"done in {outcome.seconds:.1f} s"
    print(f"{outcome.stage}: {done} -> {outcome.path}")


if __name__ == "__main__":
    sys.exit(main())
