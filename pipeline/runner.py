"""Running a pipeline stage: skip it when nothing it depends on changed, never leave half an output.

Each stage writes into a hidden work folder named by its fingerprint (its configuration
sections, the fingerprints of the stages it reads, the seed, its own code and any input files it
watches); the folder replaces the stage's outputs, with `stage.json` (fingerprint and summary),
only when the stage finished. A rerun whose fingerprint matches a finished stage is skipped, so an
interrupted pipeline continues from the last finished stage; an interrupted stage finds its work
folder again (training resumes from its last epoch there). Under torchrun every process runs the
stage and rank 0 alone writes. DVC runs the same stages and keeps its
own record (dvc.lock) on top; dvc.yaml lists the same code per stage (`stage_code`).

Callers hold the project folder (pipeline.lock.hold) while they run stages, so no other run can be
writing the work folders that `execute` resumes or clears.
"""
import ast
import functools
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
from convheads.engine import distributed

from .config import PipelineConfig
from .hashing import short_hash

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


# The project's own code; a stage's fingerprint covers the part of it that the stage runs. The
# method library counts as one piece (its __init__ imports nearly all of it): editing convheads/
# reruns every stage that uses it. Pipeline code counts file by file, so editing the tracking or
# registry code, or another stage, retrains nothing.
CODE_PACKAGES = ("convheads", "pipeline")
WHOLE_PACKAGES = ("convheads",)
# What pipeline/config.py means to a stage is its configuration values, which the fingerprint holds
# already: editing the schema (say, a new registry setting) must not retrain anything.
NOT_STAGE_CODE = {"pipeline/config.py"}


def _module_file(module: str) -> Optional[Path]:
    base = PROJECT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path, module: str) -> set:
    """The project modules (and their parent packages) that the file of `module` imports, anywhere in it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] in CODE_PACKAGES:
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if _module_file(m) is not None}


@functools.lru_cache(maxsize=None)
def stage_code(module: str) -> Tuple[str, ...]:
    """What `module` runs of the project: itself and every project module it imports, transitively,
    plus this runner (it seeds every stage); a whole package for WHOLE_PACKAGES. Paths relative to
    the project, sorted, as dvc.yaml lists them in each stage's deps."""
    todo, seen = [module, __name__], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.split(".")[0] in WHOLE_PACKAGES or _rel(_module_file(name)) in NOT_STAGE_CODE:
            continue
        todo.extend(_imported_modules(_module_file(name), name))
    paths = set()
    for name in seen:
        top = name.split(".")[0]
        path = _module_file(name)
        if top in WHOLE_PACKAGES:
            paths.add(top)
        elif _rel(path) not in NOT_STAGE_CODE and _runs_code(path):
            paths.add(_rel(path))
    return tuple(sorted(paths))


def _runs_code(path: Path) -> bool:
    """Whether a file does more than carry a docstring (a package's __init__ often does not)."""
    body = ast.parse(path.read_text(), str(path)).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def _rel(path: Path) -> str:
    return path.relative_to(PROJECT).as_posix()


def code_version(stage: "Stage") -> str:
    """A hash of the code `stage` runs (its stage_code): editing any of it reruns the stage."""
    h = hashlib.sha256()
    for rel in stage_code(stage.run.__module__):
        root = PROJECT / rel
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(_rel(path).encode())
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
    return short_hash({"stage": stage.name, "config": cfg.section(*stage.sections), "seed": cfg.seed,
                       "upstream": upstream, "code": code_version(stage),
                       "watch": stage.watch(cfg) if stage.watch else None})


def up_to_date(stages, cfg: PipelineConfig) -> Optional[str]:
    """If every stage has finished with its current inputs, the combined fingerprint; else None."""
    fps = []
    for stage in stages:
        record = read_record(cfg, stage.name)
        if record is None or record["fingerprint"] != fingerprint(stage, cfg):
            return None
        fps.append(record["fingerprint"])
    return short_hash(fps)


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
    if not distributed.is_main():  # a torchrun worker beside rank 0, which writes the outputs
        return Outcome(stage.name, out, summary, fp, False, time.perf_counter() - start)
    (work / STAGE_FILE).write_text(json.dumps({"stage": stage.name, "fingerprint": fp, "summary": summary},
                                              indent=2, sort_keys=True))
    _swap(work, out)
    # Attempts with other inputs: runs that are gone, since the caller holds the folder (pipeline.lock).
    for stale in out.parent.glob(f".{out.name}.*.partial"):
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
