"""benchmarks.device_check --quick: every part's code path on the CPU, and parts a-c free of prefect, mlflow, dvc."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

PROJECT = Path(__file__).resolve().parent.parent

RUN = """
import sys
from benchmarks import device_check
rc = device_check.main(["--quick", "--parts", "a", "b", "c", "--out", sys.argv[1] + "/abc"])
print("IMPORTED", sorted(m for m in ("prefect", "mlflow", "dvc") if m in sys.modules))
rc |= device_check.main(["--quick", "--parts", "d", "--out", sys.argv[1] + "/d"])
sys.exit(rc)
"""


@pytest.mark.slow
def test_the_quick_device_check_runs_every_part_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], cwd=PROJECT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout
    rows = pd.concat([pd.read_csv(tmp_path / part / "device_check.csv") for part in ("abc", "d")])
    a = rows[rows.part == "a"]
    assert set(a.variant) == {"depthwise", "depthwise_global", "identity", "fixed", "drop", "ensemble", "dsp_gated"}
    measured = a[a.max_rel_err.notna()]
    assert len(measured) == 7 * 2 * 2   # fp32 and bf16 (fp16 is skipped on a CPU), train and eval
    assert (measured.max_rel_err <= measured.tolerance).all() and measured.ok.astype(bool).all()
    b = rows[(rows.part == "b") & rows.speedup.notna()]
    assert set(b.runtime) == {"eager", "compile"} and set(b.batch) == {1, 4}
    assert set(b.variant) == {"original", "depthwise", "depthwise_global", "identity", "ensemble"}
    assert (b[b.variant == "original"].speedup == 1).all() and (b.median_ms > 0).all()
    c = rows[rows.part == "c"]
    assert sorted(c.grad_checkpointing.astype(bool)) == [False, True] and (c.images_per_s > 0).all()
    d = rows[rows.part == "d"]
    assert list(d.variant) == ["data", "baseline", "score", "select", "replace", "recover", "evaluate", "benchmark"]
    assert d.ok.astype(bool).all()
    report = (tmp_path / "abc" / "device_check.md").read_text()
    assert "commit" in report and "python -m benchmarks.device_check --quick" in report
