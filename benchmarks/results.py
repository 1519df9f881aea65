"""Measurements as files: every benchmark writes its table through `write_results`, which puts
`results/<name>.csv` (the rows) beside `results/<name>.json` (the stamp: what produced them).

The stamp holds the table's title and the docs page it belongs on (benchmarks/report.py renders
every CSV in results/ onto its page), the git commit, the date, the machine (CPU model and cores,
GPU if any) and the command line. Only the top level of results/ is tracked in git; working files
(models, scores, plots, smoke runs) go to its subfolders.
"""
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import pandas as pd

from convheads import ConvHeadsError
from convheads.data.loaders import cpu_cores
from convheads.files import atomic_path

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "results"
STAMP_KEYS = ("name", "title", "page", "commit", "date", "machine", "command", "columns", "notes")
# what a commit's measurements depend on: a change elsewhere (docs, tests) leaves them valid
MEASURED_CODE = ("convheads", "pipeline", "flows", "benchmarks")


def git_commit() -> str:
    """HEAD, with `-dirty` when the measured code has uncommitted changes; "unknown" outside git."""
    try:
        run = dict(cwd=PROJECT, capture_output=True, text=True, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *MEASURED_CODE], **run).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict:
    """CPU model, the cores this process may use, and the GPU (None without one)."""
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return {"cpu": cpu_model(), "cores": cpu_cores(), "gpu": gpu}


def command_line() -> str:
    """This process's command as a user would type it (`python -m benchmarks.suite ...`)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    return " ".join(argv)


def write_results(name: str, rows: Union[pd.DataFrame, Sequence[Dict]], title: str, page: str,
                  root: Union[str, Path] = RESULTS, command: Optional[str] = None,
                  columns: Optional[List[str]] = None, notes: str = "") -> Path:
    """Write `<root>/<name>.csv` and its stamp `<root>/<name>.json`, atomically; return the CSV's path.

    `columns`: the ones the docs table shows (default all); `notes`: one paragraph shown under the
    table (how to read it, not its numbers)."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if table.empty:
        raise ConvHeadsError(f"no rows to write for {name}")
    missing = [c for c in columns or () if c not in table]
    if missing:
        raise ConvHeadsError(f"{name}: columns {missing} are not in the table ({list(table.columns)})")
    root = Path(root)
    stamp = {"name": name, "title": title, "page": page, "commit": git_commit(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
             "command": command or command_line(), "columns": columns or list(table.columns), "notes": notes}
    with atomic_path(root / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(root / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    return root / f"{name}.csv"


def read_stamp(csv: Path) -> Dict:
    """The stamp beside `csv`, checked: a table without one, or with fields missing, is refused by name."""
    path = csv.with_suffix(".json")
    if not path.is_file():
        raise ConvHeadsError(f"{path} is missing: every results CSV needs its stamp; write tables with "
                             f"benchmarks.results.write_results")
    try:
        stamp = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvHeadsError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in STAMP_KEYS if k not in stamp]
    if missing:
        raise ConvHeadsError(f"{path} lacks {missing}; write tables with benchmarks.results.write_results")
    return stamp
