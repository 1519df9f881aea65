"""Replacement methods compared at an equal budget: top-1 right after replacement and after recovery.

One baseline, one scoring pass and one selection (select.* of the configuration, by default the
3 of 6 blocks with the lowest Sigma_b) are shared; each method replaces those heads its way, is
evaluated on the test split (step 0), fine-tuned with the recover.* settings for every seed and
evaluated again, on the configured task (task=segmentation: mIoU and pixel accuracy). Top-1 comes
with its exact (Clopper-Pearson) binomial 95% interval over the test images; mIoU is not a
proportion of independent trials, so segmentation rows carry the spread over seeds only.
Methods (variant, init):

  gaussian        depthwise, Gaussian kernel (the reference)
  attention_raw   depthwise, attention-fitted with the old beta (the raw patch-to-prefix weight)
  attention       depthwise, attention-fitted (beta fitted for what the layer computes)
  global          depthwise_global, attention-fitted (band + uniform level + prefix terms)
  fixed           fixed: each head's mean attention matrix (a reference, quadratic)

    python -m benchmarks.methods --baseline outputs/baseline/model.pt --seeds 0 1 2 \
        [--scores outputs/score/scores.pt] [--methods ...] [--out results/methods] \
        [key=value ...]   # configuration overrides, e.g. recover.epochs=3 or task=segmentation

Writes <out>/methods.csv (one row per method, seed and stage; rewritten after each row) and
<out>/summary.md, then the finished table as results/methods.csv (results/methods_segmentation.csv
for segmentation) with its stamp (benchmarks/results.py), which the docs' methods page shows.
"""
import argparse
import sys
from pathlib import Path
from typing import List

import pandas as pd
import torch

from convheads import ConvHeadsError, HeadScores, load_model, replace_heads, score_heads, select_heads
from convheads.files import atomic_path
from pipeline.config import load_config
from pipeline.finetune import fine_tune
from pipeline.loaders import loader
from pipeline.problems import problem
from pipeline.summary import binomial_interval

from .results import RESULTS, write_results

METHODS = {"gaussian": ("depthwise", "gaussian"), "attention_raw": ("depthwise", "attention"),
           "attention": ("depthwise", "attention"), "global": ("depthwise_global", "attention"),
           "fixed": ("fixed", "attention")}


def quality(cfg, model) -> dict:
    """The task's metrics on the test split; top-1 with its binomial interval."""
    task = problem(cfg)
    m = task.evaluate(model, loader(cfg, model, "test", cfg.evaluate.batch_size), progress=False)
    row = {k: m[k] for k in task.metrics if k != "loss"}
    if "top1" in row:
        correct = round(m["top1"] * m["num_images"])
        row.update(zip(("ci_low", "ci_high"), binomial_interval(correct, m["num_images"])), correct=correct)
    return {**row, "n": m["num_images"]}


def build(method: str, baseline: Path, selection, scores: HeadScores, kernel_size: int, seed: int):
    variant, init = METHODS[method]
    torch.manual_seed(seed)  # the Gaussian init's alpha, beta are random
    model = replace_heads(load_model(baseline), selection, kernel_size=kernel_size, init=init, variant=variant,
                          scores=scores)
    if method == "attention_raw":
        use_raw_beta(model, scores, selection)
    return model


@torch.no_grad()
def use_raw_beta(model, scores: HeadScores, selection) -> None:
    """The prefix fit before it was fitted for what the layer computes: beta = the raw mean weight
    from a patch to each prefix token."""
    for b, heads in selection.heads.items():
        model.blocks[b].attn.mixer.beta.copy_(scores.patch_to_prefix[b, heads].T)


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True, help="a baseline model.pt (the baseline stage's)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the configuration file")
    p.add_argument("--scores", type=Path, help="the score stage's scores.pt (default: score the baseline)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--no-recover", action="store_true", help="step-0 accuracy only")
    p.add_argument("--out", type=Path, default=RESULTS / "methods", help="working folder (scores, recoveries)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the stamped table goes")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.params, overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    score_file = args.scores or args.out / "scores.pt"
    if score_file.is_file():
        scores = HeadScores.from_dict(torch.load(score_file, weights_only=True))
    else:
        model = load_model(args.baseline)
        scores = score_heads(model, loader(cfg, model, "train", cfg.score.batch_size, train=True),
                             max_images=cfg.score.max_images)
        torch.save(scores.to_dict(), score_file)
    s = cfg.select
    selection = select_heads(scores, count=s.count, fraction=None if s.count else s.fraction,
                             granularity=s.granularity, method=s.method, kernel_size=cfg.replace.kernel_size)
    print(f"selection ({s.method}): {selection}", flush=True)
    headline = problem(cfg).headline
    rows = [{"method": "baseline", "seed": None, "stage": "baseline", **quality(cfg, load_model(args.baseline))}]
    for method in args.methods:
        for seed in args.seeds:
            model = build(method, args.baseline, selection, scores, cfg.replace.kernel_size, seed)
            rows.append({"method": method, "seed": seed, "stage": "replaced", **quality(cfg, model)})
            print(rows[-1], flush=True)
            if not args.no_recover:
                run_cfg = cfg.model_copy(update={"seed": seed})
                work = args.out / f"{method}-{seed}"
                work.mkdir(exist_ok=True)
                fine_tune(run_cfg, "recover", model, work)
                rows.append({"method": method, "seed": seed, "stage": "recovered", **quality(cfg, model)})
                print(rows[-1], flush=True)
            with atomic_path(args.out / "methods.csv") as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False)
    table = pd.DataFrame(rows)
    stats = dict(seeds=(headline, "size"), mean=(headline, "mean"), min=(headline, "min"), max=(headline, "max"))
    if headline == "top1":
        stats.update(ci_low_min=("ci_low", "min"), ci_high_max=("ci_high", "max"))
    summary = table.groupby(["method", "stage"], sort=False).agg(**stats).reset_index()
    with atomic_path(args.out / "summary.md") as tmp:
        tmp.write_text(f"selection: {selection}; recover: {cfg.recover.epochs} epochs; metric: {headline}\n\n"
                       + summary.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(summary.to_string(index=False))
    write_results("methods" if headline == "top1" else f"methods_{cfg.task}", table, page="methods",
                  title=f"Replacement methods at an equal budget ({cfg.task}: {headline})",
                  columns=[c for c in ("method", "seed", "stage", headline, "ci_low", "ci_high", "pixel_acc", "n")
                           if c in table],
                  notes=f"Selection: {selection}; recovery: {cfg.recover.epochs} epochs at lr {cfg.recover.lr:g}. "
                        "`replaced` is right after replacement, `recovered` after fine-tuning; top-1 comes with its "
                        "exact (Clopper-Pearson) binomial 95% interval over the n test images.",
                  root=args.results)


if __name__ == "__main__":
    try:
        main()
    except ConvHeadsError as e:
        sys.exit(f"error: {e}")
