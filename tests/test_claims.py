"""The claims' paired comparisons, on sweep points whose per-image predictions are written by hand."""
import numpy as np
import pandas as pd
import pytest
from helpers import tiny_params

from benchmarks.claims import paired, tables
from benchmarks.int8_accuracy import seed_overrides
from benchmarks.int8_accuracy import tables as int8_tables
from convheads import ConvHeadsError
from pipeline.config import merge, parse_overrides, validate
from pipeline.frontier import point_config
from pipeline.runner import output_dir

IMAGES = 2000


def write_points(cfg, right):
    """right: {method: share of the test images each model gets right}; the same images across seeds."""
    labels = np.arange(IMAGES) % 10
    for method, share in right.items():
        for budget in cfg.sweep.budgets:
            for seed in cfg.sweep.seeds:
                wrong = np.random.default_rng(seed).random(IMAGES) > share
                predicted = np.where(wrong, (labels + 1) % 10, labels)
                folder = output_dir(point_config(cfg, method, budget, seed), "evaluate")
                folder.mkdir(parents=True, exist_ok=True)
                pd.DataFrame({"label": labels, "baseline": labels, "replaced": predicted, "compressed": predicted}
                             ).to_csv(folder / "predictions.csv", index_label="image")


def test_a_real_gap_is_separated_and_no_gap_is_not(tmp_path):
    params = tiny_params(tmp_path)
    params["sweep"].update(methods=["sigma_b", "random", "drop"], budgets=[0.5], seeds=[0, 1, 2])
    cfg = validate(params)
    write_points(cfg, {"sigma_b": 0.9, "random": 0.8, "drop": 0.9})
    table = tables(cfg).set_index(["other", "model"])
    gap = table.loc[("random", "compressed")]
    assert gap.verdict == "sigma_b better" and gap.ci_low > 5 and abs(gap.difference - 10) < 3
    same = table.loc[("drop", "compressed")]  # the same draws: every image agrees
    assert same.verdict == "not separated" and same.difference == 0
    assert set(table.claim) == {"a", "b"} and (table.seeds == 3).all()


def test_the_interval_is_paired_over_images():
    rng = np.random.default_rng(0)
    first = (rng.random((3, 5000)) < 0.9).astype(np.int8)
    flipped = first.copy()
    flipped[:, :50] = 1 - flipped[:, :50]  # 1% of the images differ, on every seed
    result = paired(first, flipped)
    # unpaired, two 5,000-image proportions near 90% differ by +-1.2 points by chance; paired, far less
    assert result["ci_high"] - result["ci_low"] < 1.0


def test_a_point_that_never_ran_is_named(tmp_path):
    params = tiny_params(tmp_path)
    params["sweep"].update(methods=["sigma_b", "random"], budgets=[0.5], seeds=[0])
    with pytest.raises(ConvHeadsError, match="sweep point sigma_b at budget 0.5, seed 0 has not been evaluated"):
        tables(validate(params))


def write_int8_run(cfg, fp32_right, flipped):
    """The evaluate stage's files for one run: float32 right on fp32_right of the images, INT8 the same
    but with the first `flipped` images' answers turned wrong."""
    labels = np.arange(IMAGES) % 10
    wrong = np.random.default_rng(cfg.seed).random(IMAGES) > fp32_right
    fp32 = np.where(wrong, (labels + 1) % 10, labels)
    int8 = fp32.copy()
    int8[:flipped] = (labels[:flipped] + 2) % 10
    folder = output_dir(cfg, "evaluate")
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"label": labels, "baseline": labels, "replaced": fp32, "compressed": fp32,
                  "compressed_int8": int8}).to_csv(folder / "predictions.csv", index_label="image")
    (folder / "metrics.json").write_text('{"int8_quantization": "static"}')


def test_the_int8_drop_is_paired_per_seed_and_over_all_seeds(tmp_path):
    base = tiny_params(tmp_path)
    configs = {seed: validate(merge(base, parse_overrides(seed_overrides(validate(base), seed)))) for seed in (0, 1)}
    for seed, cfg in configs.items():
        write_int8_run(cfg, 0.9 - 0.1 * seed, flipped=40)   # 2% of the images flipped, right or wrong before
    table = int8_tables(configs).set_index("seeds")
    assert list(table.index) == ["0", "1", "all"] and (table.quantization == "static").all()
    assert not configs[0].registry.enabled and configs[0].benchmark.runtimes[0] == "onnxruntime-int8"
    # each seed's run is read from its own folder: a shared one would give both rows the last run's
    assert table.loc["0"].top1_fp32 - table.loc["1"].top1_fp32 == pytest.approx(10, abs=3)
    assert (table.agreement == 98).all()
    everything = table.loc["all"]
    # flipped: 2% of the images, 80% of them right before
    assert 0 < everything.ci_low <= everything["drop"] <= everything.ci_high < 3
    assert everything.top1_fp32 - everything.top1_int8 == pytest.approx(everything["drop"], abs=1e-3)


def test_a_run_without_int8_predictions_is_named(tmp_path):
    params = tiny_params(tmp_path)
    cfg = validate(params)
    folder = output_dir(cfg, "evaluate")
    folder.mkdir(parents=True)
    pd.DataFrame({"label": [0], "compressed": [0]}).to_csv(folder / "predictions.csv", index_label="image")
    with pytest.raises(ConvHeadsError, match="no INT8 predictions for seed 0"):
        int8_tables({0: cfg})
