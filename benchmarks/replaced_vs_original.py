"""Latency of the original ViT, the depthwise-replaced one, the identity variant and a
straightforward V-projection + depthwise conv + W_O layer, timed interleaved in one process.

    python -m benchmarks.replaced_vs_original                       # the paper setting, CPU
    python -m benchmarks.replaced_vs_original --model vit_small_patch16_224 --img-size 224 --blocks 6

Default: timm vit_large_patch14_dinov2 (random weights), 336 x 336, first 12 of 24 blocks, batch 1.
Writes results/replaced_vs_original.csv and its stamp (benchmarks/results.py), shown on the docs' speed page.
"""
import argparse
import copy
from pathlib import Path

import torch
from torch import nn

import convheads
from convheads.engine.timing import latency_stats, time_models

from .results import RESULTS, write_results


class StraightforwardConvAttention(nn.Module):
    """The plain layer the fused one must not be slower than: V = x W_V, prefix tokens pass
    through, depthwise conv on the patch grid (channels-first), then W_O."""

    def __init__(self, attn: nn.Module, grid, num_prefix: int):
        super().__init__()
        C = attn.qkv.in_features
        self.v = nn.Linear(C, C)
        self.v.weight.data.copy_(attn.qkv.weight.data[2 * C:])
        self.v.bias.data.copy_(attn.qkv.bias.data[2 * C:])
        self.conv = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False)
        self.proj = attn.proj
        self.grid, self.num_prefix = grid, num_prefix

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        v = self.v(x)
        prefix, patches = v[:, :self.num_prefix], v[:, self.num_prefix:]
        patches = self.conv(patches.transpose(1, 2).reshape(B, C, *self.grid)).flatten(2).transpose(1, 2)
        return self.proj(torch.cat([prefix, patches], dim=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_large_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=336)
    p.add_argument("--blocks", type=int, default=12, help="replace every head of the first N blocks")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS, help="where replaced_vs_original.csv and its stamp go")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    original = convheads.create_model(args.model, img_size=args.img_size).eval()
    info = convheads.vit_info(original)
    selection = convheads.Selection.from_blocks(range(args.blocks), info.num_heads)
    models = {
        "original": original,
        "depthwise": convheads.replace_heads(copy.deepcopy(original), selection),
        "identity": convheads.replace_heads(copy.deepcopy(original), selection, variant="identity"),
        "straightforward": copy.deepcopy(original),
    }
    for b in range(args.blocks):
        blk = models["straightforward"].blocks[b]
        blk.attn = StraightforwardConvAttention(blk.attn, info.grid_size, info.num_prefix_tokens)

    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with torch.inference_mode():  # same function: the fused layer vs the plain one (alpha = beta = 0)
        ref = models["depthwise"]
        for b in range(args.blocks):
            ref.blocks[b].attn.mixer.conv.weight.copy_(models["straightforward"].blocks[b].attn.conv.weight)
            if info.num_prefix_tokens:
                ref.blocks[b].attn.mixer.alpha.zero_()
                ref.blocks[b].attn.mixer.beta.zero_()
        torch.testing.assert_close(ref(x), models["straightforward"](x), atol=1e-3, rtol=1e-3)

    print(f"{args.model} {args.img_size}x{args.img_size}, {args.blocks} of {info.depth} blocks replaced, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} interleaved runs "
          f"after {args.warmup} warm-up")
    times = time_models(models, x, warmup=args.warmup, repeats=args.repeats, progress=True)
    base = latency_stats(times["original"], args.batch_size)["infer_step_time"]
    print(f"{'model':<16}{'median ms':>11}{'p90 ms':>9}{'img/s':>8}{'speedup':>9}{'GMACs':>8}")
    rows = []
    for name, t in times.items():
        s = latency_stats(t, args.batch_size)
        # The straightforward layer runs depthwise's matmuls and conv (checked equal above); count those.
        gmacs = convheads.model_cost(models["depthwise" if name == "straightforward" else name]).gmacs
        print(f"{name:<16}{s['infer_step_time']:>11.1f}{s['infer_step_time_p90']:>9.1f}"
              f"{s['infer_samples_per_sec']:>8.2f}{base / s['infer_step_time']:>8.3f}x{gmacs:>8.1f}")
        rows.append({"variant": name, "median_ms": s["infer_step_time"], "p90_ms": s["infer_step_time_p90"],
                     "images_per_s": s["infer_samples_per_sec"], "speedup": base / s["infer_step_time"],
                     "gmacs": gmacs, "model": args.model, "img_size": args.img_size, "blocks": args.blocks,
                     "batch_size": args.batch_size, "threads": torch.get_num_threads(), "rounds": args.repeats})
    write_results("replaced_vs_original", rows, page="speed",
                  title=f"The replacement layer against a straightforward one: {args.model} at {args.img_size} px, "
                        f"{args.blocks} of {info.depth} blocks, batch {args.batch_size}",
                  columns=["variant", "median_ms", "p90_ms", "images_per_s", "speedup", "gmacs"],
                  notes="Latency over interleaved rounds after warm-up (median and 90th percentile); speedup over "
                        "the original. `straightforward` is a plain V projection + depthwise conv + W_O layer, "
                        "checked equal to `depthwise` before timing; `identity` (one C x C map per block) is the "
                        "speed limit of removing attention.",
                  root=args.out)


if __name__ == "__main__":
    main()
