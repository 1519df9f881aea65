"""The paper's claims, tested: paired comparisons of sweep points on the same test images.

    python -m benchmarks.claims                 # the claims sweep (flows.sweep, CLAIMS below), then the tables
    python -m benchmarks.claims --tables-only   # the tables from a finished sweep
    python -m benchmarks.claims sweep.seeds=[0,1,2,3,4] sweep.recover_epochs=3   # configuration overrides
    python -m benchmarks.claims --name claims_dsp sweep.methods=[sigma_b,dsp] sweep.budgets=[0.5]   # d alone
    python -m benchmarks.claims sweep.recover_epochs=2   # DSP's last epoch then trains its finalised model

Every comparison is of two sweep methods at one budget, with the same seeds: on each test image and
seed, 1 if the model is right, 0 if not; the difference of the two models' top-1 is averaged over
the seeds, and its 95% interval comes from a paired bootstrap over the test images (the same images
drawn for both models and every seed, so the images' shared difficulty cancels). A comparison whose
interval holds 0 is one the test split cannot decide. Comparisons (the claim: the first beats the
second):

  a. sigma_b vs random, sigma_b vs sigma_b_high: Sigma_b picks the blocks to replace, before and after recovery
  b. sigma_b (the depthwise convolution) vs drop, vs identity: at the same selection
  c. sigma_b (attention-fitted kernels) vs gaussian (Gaussian kernels)
  d. dsp vs sigma_b: the learned selection, after recovery

Writes results/claims.csv with its stamp (benchmarks/results.py), shown on docs/results/testbed.md.
Classification only (segmentation has no per-image correctness).
"""
import argparse
import sys
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from convheads import ConvHeadsError
from flows import checked_config
from pipeline.config import PipelineConfig
from pipeline.frontier import point_config
from pipeline.runner import output_dir
from pipeline.stages.evaluate import PREDICTIONS

from .results import write_results

# A baseline of 10 epochs, one recovery epoch per point (63 points on 2 cores); accuracy is the point here,
# so the sweep's timing of every model is kept short (the speed pages time properly).
CLAIMS = ["sweep.methods=[sigma_b,random,sigma_b_high,drop,identity,gaussian,dsp]", "sweep.seeds=[0,1,2]",
          "baseline.epochs=10",
          "sweep.recover_epochs=1", "recover.warmup_epochs=0.2", "benchmark.batch_sizes=[1]",
          "benchmark.runtimes=[eager]", "benchmark.repeats=3", "benchmark.warmup=1"]
# (claim, method, other, models compared: replaced = before recovery, compressed = after)
COMPARISONS = [("a", "sigma_b", "random", ("replaced", "compressed")),
               ("a", "sigma_b", "sigma_b_high", ("replaced", "compressed")),
               ("b", "sigma_b", "drop", ("replaced", "compressed")),
               ("b", "sigma_b", "identity", ("replaced", "compressed")),
               ("c", "sigma_b", "gaussian", ("replaced", "compressed")),
               ("d", "dsp", "sigma_b", ("compressed",))]
BOOTSTRAP = 2000
COLUMNS = ["claim", "budget", "model", "method", "other", "seeds", "top1", "other_top1", "difference", "ci_low",
           "ci_high", "verdict"]


def correct(cfg: PipelineConfig, method: str, budget: float, seed: int) -> pd.DataFrame:
    """[test images] x {label, baseline, replaced, compressed}: 1 where that model is right."""
    path = output_dir(point_config(cfg, method, budget, seed), "evaluate") / PREDICTIONS
    if not path.is_file():
        raise ConvHeadsError(f"{path} is missing: sweep point {method} at budget {budget:g}, seed {seed} has not "
                             f"been evaluated; run python -m benchmarks.claims without --tables-only")
    table = pd.read_csv(path, index_col="image")
    return pd.DataFrame({m: (table[m] == table["label"]).astype(np.int8) for m in ("replaced", "compressed")})


def paired(first: np.ndarray, second: np.ndarray, seed: int = 0) -> Dict:
    """first, second: [seeds, images] 0/1. The mean difference (points of top-1) and its 95% paired
    bootstrap interval over the images."""
    diff = (first.astype(np.float64) - second).mean(axis=0)           # [images]: averaged over the seeds
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))
    boot = diff[draws].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"difference": 100 * diff.mean(), "ci_low": 100 * low, "ci_high": 100 * high}


def verdict(row: Dict) -> str:
    if row["ci_low"] > 0:
        return f"{row['method']} better"
    if row["ci_high"] < 0:
        return f"{row['other']} better"
    return "not separated"


def tables(cfg: PipelineConfig, skip_missing: bool = False) -> pd.DataFrame:
    """A row per comparison, budget and model compared; skip_missing: leave out comparisons whose
    points have not run (a sweep run in parts), saying which."""
    rows: List[Dict] = []
    seeds = cfg.sweep.seeds
    for claim, method, other, models in COMPARISONS:
        if method not in cfg.sweep.methods or other not in cfg.sweep.methods:
            continue
        for budget in cfg.sweep.budgets:
            try:
                a = [correct(cfg, method, budget, s) for s in seeds]
                b = [correct(cfg, other, budget, s) for s in seeds]
            except ConvHeadsError as e:
                if not skip_missing:
                    raise
                print(f"left out: {method} vs {other} at {budget:g} ({e})", file=sys.stderr)
                continue
            if any(len(x) != len(a[0]) for x in a + b):
                raise ConvHeadsError("the sweep points were evaluated on different test splits; rerun the sweep")
            for model in models:
                first = np.stack([x[model].to_numpy() for x in a])
                second = np.stack([x[model].to_numpy() for x in b])
                row = {"claim": claim, "budget": budget, "model": model,
                       "method": method, "other": other, "seeds": len(seeds), "top1": 100 * first.mean(),
                       "other_top1": 100 * second.mean(), **paired(first, second)}
                rows.append({**row, "verdict": verdict(row)})
    if not rows:
        raise ConvHeadsError(f"sweep.methods {cfg.sweep.methods} hold no pair that a claim compares")
    return pd.DataFrame(rows)[COLUMNS].round(3)


def per_image_config(params: str, overrides: List[str], what: str) -> Optional[PipelineConfig]:
    """The checked configuration of a comparison of per-image correctness; None, the error printed,
    if it is bad or not a classification."""
    cfg = checked_config(params, overrides)
    if cfg is not None and cfg.task != "classification":
        print(f"error: {what} compare per-image correctness: task=classification only", file=sys.stderr)
        return None
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="presets/photos.yaml", help="default: the photo testbed")
    p.add_argument("--tables-only", action="store_true", help="do not run the sweep: read its finished points, "
                                                              "leaving out comparisons whose points have not run")
    p.add_argument("--name", default="claims", help="the results table: results/<name>.csv (default claims)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    overrides = CLAIMS + args.overrides
    cfg = per_image_config(args.params, overrides, "the claims")
    if cfg is None:
        return 2
    if not args.tables_only:
        from flows.sweep import main as sweep
        status = sweep(["--params", args.params, *overrides])
        if status:
            return status
    try:
        table = tables(cfg, skip_missing=args.tables_only)
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table.insert(5, "recover_epochs", cfg.sweep.recover_epochs if cfg.sweep.recover_epochs is not None
                 else cfg.recover.epochs)
    named = ["--name", args.name] if args.name != "claims" else []
    path = write_results(args.name, table, "The paper's claims, paired on the same test images", "testbed",
                         command=" ".join(["python -m benchmarks.claims", *named, *args.overrides]),
                         notes="difference: the first method's top-1 minus the other's, in points, averaged over "
                               "the seeds; ci: its 95% paired bootstrap interval over the test images. not "
                               "separated: the interval holds 0, the test split cannot decide.")
    print(table.to_string(index=False))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
