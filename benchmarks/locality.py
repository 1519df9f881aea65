"""How local the heads are, before and after fine-tuning: the pretrained backbone (model.checkpoint)
and the pipeline's fine-tuned baseline, scored on the same test images.

    python -m flows.compress && python -m benchmarks.locality    # the embedded default
    python -m benchmarks.locality --images 1024 [key=value ...]   # configuration overrides

For every head: the share of its mean patch-to-patch attention inside the 3 x 3 window around the
query (convheads/locality.py) in each model, the share a uniform head would have, and the fine-tuned
head's Sigma_h. Writes results/locality.csv with its stamp (shown on docs/results/testbed.md) and a
heads x blocks picture of each model, beside Sigma_h, under docs/figures/.
"""
import argparse
import sys

import pandas as pd

from convheads import ConvHeadsError, create_model, score_heads
from convheads.locality import local_share, uniform_share
from flows import checked_config
from pipeline.artifacts import stage_model
from pipeline.loaders import loader
from pipeline.plots import plot_locality

from .results import PROJECT, write_results

WINDOW = 3
FIGURES = PROJECT / "docs" / "figures"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.locality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="presets/photos.yaml", help="default: the photo testbed")
    p.add_argument("--images", type=int, default=512, help="test images the heads are scored on (default 512)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = checked_config(args.params, args.overrides)
    if cfg is None:
        return 2
    try:
        if not cfg.model.checkpoint:
            raise ConvHeadsError("model.checkpoint is not set: locality before fine-tuning needs the pretrained "
                                 "backbone the baseline started from")
        models = {"pretrained": create_model(cfg.model.name, checkpoint=cfg.model.checkpoint, num_classes=0),
                  "fine_tuned": stage_model(cfg, "baseline")}
        local, scores = {}, {}
        for name, model in models.items():
            batches = loader(cfg, models["fine_tuned"], "test", 64)  # the same images, preprocessed alike
            scores[name] = score_heads(model, batches, max_images=args.images, progress=False,
                                       tokens=cfg.score.sigma_tokens)
            local[name] = local_share(scores[name], WINDOW)
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tuned = scores["fine_tuned"]
    uniform = uniform_share(tuned.grid_size, tuned.num_prefix_tokens, WINDOW)
    depth, heads = tuned.sigma_h.shape
    table = pd.DataFrame([{"block": b, "head": h, "pretrained": local["pretrained"][b, h].item(),
                           "fine_tuned": local["fine_tuned"][b, h].item(), "uniform": uniform,
                           "sigma_h": tuned.sigma_h[b, h].item()} for b in range(depth) for h in range(heads)])
    for name in models:
        plot_locality(local[name], scores[name].sigma_h, uniform, FIGURES / f"locality_{name}.png",
                      f"{name.replace('_', '-')} {cfg.model.name}, {tuned.num_images} test images")
    path = write_results("locality", table.round(4), "Every head's share of attention inside its 3 x 3 window",
                         "testbed", command=f"python -m benchmarks.locality {' '.join(argv or sys.argv[1:])}".strip(),
                         notes=f"pretrained: the backbone of model.checkpoint; fine_tuned: the pipeline's baseline; "
                               f"uniform: the share of a head that attends evenly. A head at 0.5 or more puts half "
                               f"its attention on its {WINDOW} x {WINDOW} neighbourhood: a convolution's job. "
                               f"Pictures: docs/figures/locality_pretrained.png, locality_fine_tuned.png.")
    for name in models:
        n = int((local[name] >= 0.5).sum())
        print(f"{name}: {n} of {depth * heads} heads put >= 50% of their attention inside {WINDOW} x {WINDOW} "
              f"(uniform {uniform:.1%}; the most local {local[name].max().item():.1%})")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
