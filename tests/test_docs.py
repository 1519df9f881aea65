"""The docs: results pages generated from the stamped CSVs in results/, the configuration reference
generated from the schema, references to files that exist, and the site built strictly offline."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import report
from benchmarks.results import RESULTS, read_stamp, write_results
from convheads import ConvHeadsError
from pipeline.config import PipelineConfig
from pipeline.params_file import REFERENCE_FILE, check_reference, reference_markdown
from pipeline.tracking import flatten

PROJECT = Path(__file__).resolve().parent.parent


def test_the_committed_results_pages_are_what_the_committed_csvs_give():
    assert report.stale(report.render(RESULTS)) == []


def copy_results(tmp_path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    for f in RESULTS.glob("*.csv"):
        shutil.copy(f, results)
        shutil.copy(f.with_suffix(".json"), results)
    return results


def test_a_new_table_lands_on_its_page_with_its_stamp_and_replaces_the_how_to(tmp_path):
    results = copy_results(tmp_path)
    before = report.render(results)["training.md"]
    assert "python -m benchmarks.train_speed throughput" in before and "| images_per_sec |" not in before
    rows = [{"model": "digits", "precision": "bf16", "images_per_sec": 123.456, "loadavg": 0.5},
            {"model": "digits", "precision": "fp32", "images_per_sec": 98765.4, "loadavg": float("nan")}]
    write_results("train_throughput", rows, title="Throughput, bf16 and fp32", page="training", root=results,
                  command="python -m benchmarks.train_speed throughput", notes="How to read it.",
                  columns=["model", "precision", "images_per_sec"])
    stamp = read_stamp(results / "train_throughput.csv")
    page = report.render(results)["training.md"]
    assert "## Throughput, bf16 and fp32" in page and "How to read it." in page
    assert "| model | precision | images_per_sec |\n| --- | --- | --- |\n| digits | bf16 | 123.5 |\n" \
           "| digits | fp32 | 98,765 |" in page
    assert f"`{stamp['commit'][:12]}` on {stamp['date']}, {stamp['machine']['cpu']}, " \
           f"{stamp['machine']['cores']} cores" in page
    assert "```bash\npython -m benchmarks.train_speed throughput\n```" in page
    assert "results/train_throughput.csv`, images/s" not in page  # no longer listed as not measured
    assert "Throughput, bf16 and fp32" in report.render(results)["index.md"]


def test_a_page_whose_csv_is_missing_fails_naming_the_file(tmp_path, capsys):
    results = copy_results(tmp_path)
    required = report.PAGES["methods"].required[0]
    (results / f"{required}.csv").unlink()
    with pytest.raises(ConvHeadsError, match=re.escape(str(results / f"{required}.csv")) + " is missing"):
        report.render(results)
    assert report.main(["--results", str(results), "--docs", str(tmp_path / "docs")]) == 2
    assert f"{required}.csv is missing" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()


def test_a_csv_without_its_stamp_or_on_an_unknown_page_is_refused(tmp_path):
    results = copy_results(tmp_path)
    pd.DataFrame({"a": [1]}).to_csv(results / "loose.csv", index=False)
    with pytest.raises(ConvHeadsError, match=re.escape(str(results / "loose.json")) + " is missing"):
        report.render(results)
    write_results("loose", [{"a": 1}], title="t", page="nowhere", root=results)
    with pytest.raises(ConvHeadsError, match="page 'nowhere'"):
        report.render(results)


def test_check_mode_names_a_stale_page(tmp_path, capsys):
    results, docs = copy_results(tmp_path), tmp_path / "docs"
    assert report.main(["--results", str(results), "--docs", str(docs)]) == 0
    assert report.main(["--check", "--results", str(results), "--docs", str(docs)]) == 0
    (docs / "speed.md").write_text((docs / "speed.md").read_text() + "a number copied by hand\n")
    assert report.main(["--check", "--results", str(results), "--docs", str(docs)]) == 1
    assert "speed.md" in capsys.readouterr().err


def test_the_configuration_reference_is_generated_from_the_schema_and_lists_every_key():
    check_reference(REFERENCE_FILE)
    page = reference_markdown()
    keys = flatten(PipelineConfig.model_validate({}).model_dump(mode="json"))
    parts = {k: k.split(".") for k in keys}  # a mapping's entries (pretrain.kwargs.depth) come with their key's row
    missing = [k for k, p in parts.items() if not any(f"| `{'.'.join(p[:i])}` |" in page for i in range(1, len(p) + 1))]
    assert not missing
    assert "| `recover.epochs` | `null` | " in page and "20 for classification" in page  # a task's default


def test_code_points_only_to_files_in_the_repo():
    """A docstring or comment naming a markdown file names one that exists (docs/ pages included)."""
    named = re.compile(r"\b((?:docs/)?[\w./-]*[A-Z][\w-]*\.md|docs/[\w./-]+\.md)\b")
    missing = []
    for folder in ("convheads", "pipeline", "flows", "benchmarks", "tests"):
        for path in (PROJECT / folder).rglob("*.py"):
            for name in named.findall(path.read_text()):
                if not (PROJECT / name).exists() and not (PROJECT / "docs" / name).exists():
                    missing.append(f"{path.relative_to(PROJECT)}: {name}")
    assert not missing


def build(docs_dir: Path, site: Path) -> subprocess.CompletedProcess:
    """mkdocs build --strict of a copy of the docs (not -q: quiet hides the warnings strict counts)."""
    config = (PROJECT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs_dir}")
    (docs_dir.parent / "mkdocs.yml").write_text(config)
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(docs_dir.parent / "mkdocs.yml"), "-d", str(site)], cwd=PROJECT,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_the_site_builds_strictly_offline_and_a_broken_link_fails_the_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(PROJECT / "docs", docs)
    done = build(docs, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    html = [p.read_text() for p in (tmp_path / "site").rglob("*.html")]
    assert len(html) >= 12
    external = [m for page in html for m in re.findall(r"<(?:link|script)\b[^>]*(?:href|src)=\"(https?:[^\"]+)", page)]
    assert not external  # no fonts, scripts or styles from the network
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\n[gone](no-such-page.md)\n")
    broken = build(docs, tmp_path / "site2")
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr
    (docs / "index.md").write_text((PROJECT / "docs" / "index.md").read_text() + "\n[gone](method.md#no-such-anchor)\n")
    broken = build(docs, tmp_path / "site3")
    assert broken.returncode != 0 and "no-such-anchor" in broken.stderr
