"""The claims' paired comparisons, on sweep points whose per-image predictions are written by hand."""
import numpy as np
import pandas as pd
import pytest
from helpers import tiny_params

from benchmarks.claims import paired, tables
from convheads import ConvHeadsError
from pipeline.config import validate
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
