"""How closely each replacement, fitted to the scores, computes what a head does on average.

For every block of a model (random weights by default: the maths, not the task), the heads are
scored on `--images` random images; on as many other random images, every block's attention is
replaced whole by each method in turn and its output compared, on the same input tokens, with
the mean-attention output (each head's E[A] @ V: what an input-independent replacement can at
best compute; also on the patch tokens alone) and with the attention itself. The prefix tokens
(timm initialises them at ~1e-6, where they would carry nothing) are drawn from N(0, 1). Relative
L2 errors, averaged over blocks, and the
mean fit score (fitting.fit_scores) per variant.

    python -m benchmarks.fit_check --model vit_small_patch14_reg4_dinov2 --img-size 224   # the DINOv2-reg4 shape

Writes results/fit_check.csv and its stamp (benchmarks/results.py), shown on the docs' methods page.
"""
import argparse
import copy
from pathlib import Path

import pandas as pd
import torch

from convheads import Selection, create_model, fit_scores, replace_heads, score_heads, vit_info

from .methods import METHODS, use_raw_beta
from .results import RESULTS, write_results


def block_inputs(model, images):
    """The tokens entering every block's attention: [depth] of [B, N, C]."""
    seen = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
             for i, b in enumerate(model.blocks)]
    model.forward_features(images)
    for h in hooks:
        h.remove()
    return [seen[i] for i in range(len(model.blocks))]


def relative(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_reg4_dinov2")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS, help="where fit_check.csv and its stamp go")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size).eval()
    for name in ("cls_token", "reg_token"):  # timm starts them at ~1e-6: give them values of the patches' size
        if getattr(model, name, None) is not None:
            torch.nn.init.normal_(getattr(model, name))
    info = vit_info(model)
    scores = score_heads(model, [torch.randn(args.images, 3, args.img_size, args.img_size)], progress=False)
    inputs = block_inputs(model, torch.randn(args.images, 3, args.img_size, args.img_size))
    everything = Selection({b: range(info.num_heads) for b in range(info.depth)}, info.depth, info.num_heads)
    built = {}
    for name, (variant, init) in METHODS.items():
        built[name] = replace_heads(copy.deepcopy(model), everything, kernel_size=args.kernel_size, init=init,
                                    variant=variant, scores=scores)
        if name == "attention_raw":
            use_raw_beta(built[name], scores, everything)
    rows = []
    for name, m in built.items():
        vs_mean = [relative(m.blocks[b].attn(x), built["fixed"].blocks[b].attn(x)) for b, x in enumerate(inputs)]
        vs_attn = [relative(m.blocks[b].attn(x), model.blocks[b].attn(x)) for b, x in enumerate(inputs)]
        P = info.num_prefix_tokens  # the patch tokens alone: where beta acts
        patches = [relative(m.blocks[b].attn(x)[:, P:], built["fixed"].blocks[b].attn(x)[:, P:])
                   for b, x in enumerate(inputs)]
        rows.append({"method": name, "variant": METHODS[name][0], "init": METHODS[name][1],
                     "error_vs_mean_attention": sum(vs_mean) / len(vs_mean),
                     "error_vs_attention": sum(vs_attn) / len(vs_attn),
                     "patch_error_vs_mean_attention": sum(patches) / len(patches)})
    fits = {v: fit_scores(scores, args.kernel_size, v).mean().item() for v in ("depthwise", "depthwise_global")}
    print(f"{args.model} {args.img_size}px, random weights: {info.depth} blocks x {info.num_heads} heads, "
          f"{info.num_prefix_tokens} prefix tokens, {info.grid_size} grid; {args.images} images scored, "
          f"{args.images} others compared; mean fit score {fits}")
    table = pd.DataFrame(rows)
    for variant, fit in fits.items():
        table.loc[table.variant == variant, "mean_fit_score"] = fit
    print(table.to_string(index=False, float_format="{:.4f}".format))
    write_results("fit_check", table, page="methods",
                  title=f"Each replacement against the mean attention: {args.model} at {args.img_size} px, "
                        f"random weights",
                  notes=f"{info.depth} blocks x {info.num_heads} heads, {info.num_prefix_tokens} prefix tokens "
                        f"(drawn from N(0, 1)), a {info.grid_size[0]} x {info.grid_size[1]} grid; {args.images} images "
                        f"scored and {args.images} others compared. Relative L2 error of each block's replaced "
                        f"attention against its mean-attention output E[A] V (all tokens, and the patch tokens "
                        f"alone) and against the attention itself, averaged over blocks; the fit score "
                        f"(convheads.fit_scores) of the variant, averaged over heads (`fixed` has none).",
                  root=args.out)


if __name__ == "__main__":
    main()
