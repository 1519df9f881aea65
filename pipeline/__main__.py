"""Command line for single stages (what dvc.yaml runs), for logging a finished pipeline, and for
the configuration file.

    python -m pipeline run STAGE [--params params.yaml] [--force] [key=value ...]
    python -m pipeline track [--params params.yaml] [key=value ...]   # every stage -> one MLflow run, registered
    python -m pipeline listing FILE [--params params.yaml] [key=value ...]   # the data source's listing -> FILE
    python -m pipeline params [--check]      # params.yaml as the schema's defaults say (--check: compare)
    python -m pipeline reference [--check]   # docs/configuration.md, the configuration reference, from the schema

Stages: data, baseline, score, select, replace, recover, evaluate, benchmark; and pretrain
(flows.pretrain). The training stages (baseline, recover) launch themselves under torchrun when
`distributed` asks for more than one process (pipeline.launch): this same command line, once per
process.
"""
import argparse
import sys
from pathlib import Path

from convheads import ConvHeadsError
from convheads.engine import distributed
from convheads.precision import resolve_device

from . import preflight
from .config import load_config
from .dag import ALL_STAGES
from .launch import TRAINING_STAGES, launch, world_size
from .lock import held_by_launcher, hold
from .params_file import (
    PARAMS_FILE,
    REFERENCE_FILE,
    check_params_file,
    check_reference,
    params_yaml,
    reference_markdown,
)
from .runner import execute
from .sources import write_listing

COMMANDS = ("run", "track", "listing", "params", "reference")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--params", default=PARAMS_FILE, help=f"configuration file (default: {PARAMS_FILE})")
    p.add_argument("--force", action="store_true", help="run: rerun even if the stage's inputs did not change")
    p.add_argument("--check", action="store_true",
                   help="params, reference: compare the file with the schema instead of writing it")
    args, rest = p.parse_known_args(argv)
    try:
        if args.command == "params":
            return _params(args.params, args.check)
        if args.command == "reference":
            return _reference(args.check)
        target = rest.pop(0) if args.command in ("run", "listing") and rest else None
        if args.command == "run" and target not in ALL_STAGES:
            p.error(f"run needs a stage name, one of: {', '.join(ALL_STAGES)}")
        if args.command == "listing" and not target:
            p.error("listing needs the file to write")
        cfg = load_config(args.params, rest)
        if args.command == "listing":  # DVC's view of a folder source (dvc.yaml: stage source)
            write_listing(cfg, Path(target))
            return 0
        # the first stage checks the whole configuration before any work; every stage the devices
        (preflight.check if target == "data" else preflight.check_devices)(cfg)
        if distributed.launched():  # a torchrun worker: the launcher holds the folders (or rank 0 does)
            return _worker(cfg, target, args.force)
        launched = target in TRAINING_STAGES and world_size(cfg) > 1
        if launched and cfg.distributed.node_rank > 0:  # node 0's run holds the (shared) folders
            return launch(cfg, argv if argv is not None else sys.argv[1:])
        with hold(cfg, f"python -m pipeline {args.command}" + (f" {target}" if target else "")):
            if launched:
                return launch(cfg, argv if argv is not None else sys.argv[1:])
            if target:
                _report(execute(ALL_STAGES[target], cfg, force=args.force))
            else:
                from .registry import register  # MLflow: imported by the one command that uses it
                from .tracking import log_all

                run_id = log_all(cfg)
                print(f"logged to MLflow run {run_id}")
                if cfg.registry.enabled:
                    r = register(cfg, run_id)
                    print(f"registered {r['model_name']} version {r['version']}: {r['promotion']}")
    except ConvHeadsError as e:
        if distributed.is_main():  # every process meets the same bad input: one says so
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _params(path: str, check: bool) -> int:
    if not check:
        print(params_yaml(), end="")
        return 0
    check_params_file(Path(path))
    print(f"{path} is what the schema (pipeline/config.py) says")
    return 0


def _reference(check: bool) -> int:
    if check:
        check_reference(REFERENCE_FILE)
        print(f"{REFERENCE_FILE} is what the schema (pipeline/config.py) says")
        return 0
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(reference_markdown())
    print(f"wrote {REFERENCE_FILE}")
    return 0


def _worker(cfg, stage, force: bool) -> int:
    """One of torchrun's processes: join the group, run the stage together (rank 0 writes)."""
    if stage not in TRAINING_STAGES:
        raise ConvHeadsError(f"only the training stages ({', '.join(TRAINING_STAGES)}) run under torchrun; "
                             f"run {stage} as python -m pipeline run {stage}")
    distributed.setup(distributed.local_device(resolve_device(cfg.device)))
    try:
        with held_by_launcher(cfg, f"python -m pipeline run {stage} (torchrun)"):
            outcome = execute(ALL_STAGES[stage], cfg, force=force)
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
