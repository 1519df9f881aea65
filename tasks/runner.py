"""Running a pipeline stage: skip it when nothing it depends on changed, never leave half an output.

Each stage writes into a hidden work folder named by its fingerprint (its configuration
sections, the fingerprints of the stages it reads, the seed and the version of the code); the
folder replaces the stage's outputs, with `stage.json` (fingerprint and summary), only when the
stage finished. A rerun whose fingerprint matches a finished stage is skipped, so an interrupted
pipeline continues from the last finished stage; an interrupted stage finds its work folder
again (training resumes from its last epoch there). DVC runs the same stages and keeps its own
record (dvc.lock) on top.
"""
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from convheads import ConvHeadsError

from .config import PipelineConfig

PROJECT = Path(__file__).resolve().parent.parent
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[PipelineConfig, Path], dict]  # writes its files into the folder; returns a summary
    sections: Tuple[str, ...]                    # configuration sections it reads
    needs: Tuple[str, ...] = ()                  # stages whose outputs it reads
    watch: Optional[Callable[[PipelineConfig], Any]] = None  # more inputs to fingerprint (e.g. a source folder)


@dataclass(frozen=True)
class Outcome:
    stage: str
    path: Path
    summary: dict
    fingerprint: str
    skipped: bool
    seconds: float


def output_dir(cfg: PipelineConfig, name: str) -> Path:
    return Path(cfg.paths.data) if name == "data" else Path(cfg.paths.outputs) / name


def code_version() -> str:
    """A hash of the library, stage and timing code: changing any reruns the stages."""
    h = hashlib.sha256()
    for path in sorted(p for part in ("convheads", "tasks", "benchmarks") for p in (PROJECT / part).rglob("*.py")):
        h.update(path.relative_to(PROJECT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def read_record(cfg: PipelineConfig, name: str) -> Optional[dict]:
    """A finished stage's stage.json, or None if the stage has not finished."""
    path = output_dir(cfg, name) / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def fingerprint(stage: Stage, cfg: PipelineConfig) -> str:
    upstream = {}
    for need in stage.needs:
        record = read_record(cfg, need)
        if record is None:
            raise ConvHeadsError(f"stage {stage.name!r} needs the outputs of stage {need!r}, which has not run "
                                 f"(expected {output_dir(cfg, need)}); run the pipeline from the start")
        # The data stage's output is identified by its content: files touched but not changed rerun
        # the data stage (cheaply), not the training after it.
        upstream[need] = record["summary"].get("data_version") or record["fingerprint"]
    key = {"stage": stage.name, "config": cfg.section(*stage.sections), "seed": cfg.seed,
           "upstream": upstream, "code": code_version(), "watch": stage.watch(cfg) if stage.watch else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def up_to_date(stages, cfg: PipelineConfig) -> Optional[str]:
    """If every stage has finished with its current inputs, the combined fingerprint; else None."""
    fps = []
    for stage in stages:
        record = read_record(cfg, stage.name)
        if record is None or record["fingerprint"] != fingerprint(stage, cfg):
            return None
        fps.append(record["fingerprint"])
    return hashlib.sha256("".join(fps).encode()).hexdigest()[:16]


def execute(stage: Stage, cfg: PipelineConfig, force: bool = False) -> Outcome:
    """Run `stage` unless its finished outputs match its inputs; replace its outputs atomically."""
    start = time.perf_counter()
    fp = fingerprint(stage, cfg)
    out = output_dir(cfg, stage.name)
    record = read_record(cfg, stage.name)
    if not force and record is not None and record["fingerprint"] == fp:
        return Outcome(stage.name, out, record["summary"], fp, True, 0.0)
    # Same seed, same machine, same results: every stage starts from the configured seed.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    work = out.parent / f".{out.name}.{fp}.partial"
    work.mkdir(parents=True, exist_ok=True)  # may hold an interrupted attempt's checkpoint
    summary = stage.run(cfg, work)
    (work / STAGE_FILE).write_text(json.dumps({"stage": stage.name, "fingerprint": fp, "summary": summary},
                                              indent=2, sort_keys=True))
    _swap(work, out)
    for stale in out.parent.glob(f".{out.name}.*.partial"):  # attempts with other inputs
        shutil.rmtree(stale, ignore_errors=True)
    return Outcome(stage.name, out, summary, fp, False, time.perf_counter() - start)


def _swap(new: Path, out: Path) -> None:
    """Put `new` where `out` is; the old outputs go only once the new ones are in place."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
