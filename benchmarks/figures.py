"""The method page's figure: a head's mean attention beside the depthwise kernel fitted to it.

    python -m benchmarks.figures      # writes docs/figures/attention_kernel.png (seconds, offline)

A tiny timm ViT (random weights, 8 x 8 patches) whose first block has two positional heads (their
queries and keys read only the position embedding, so their attention falls off with distance)
beside two heads with random weights, whose attention is spread nearly uniformly: input-independent
too (a low Sigma_h), but not local, which is what the fit score and depthwise_global are for. The
heads are scored on random
images (convheads.score_heads); each row shows a head's mean attention from the centre patch over
the grid, and the 3 x 3 kernel that the attention fit (convheads.fitting) gives its replacement.
"""
import math
from pathlib import Path

import torch

from convheads import create_model, score_heads
from convheads.fitting import fit_mixing

OUT = Path(__file__).resolve().parent.parent / "docs" / "figures" / "attention_kernel.png"
GRID, DIM, HEADS = 8, 64, 4
FREQS = (0.4, 0.8, 1.2, 1.6)  # position features cos/sin(f y), cos/sin(f x): 16 channels, one head's width


def positional_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=GRID * 8, patch_size=8, embed_dim=DIM, depth=2,
                         num_heads=HEADS, num_classes=10).eval()
    d = DIM // HEADS
    with torch.no_grad():
        pos = torch.zeros(GRID * GRID, DIM)
        ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        feats = [t(f * c.flatten().float()) for f in FREQS for c in (ys, xs) for t in (torch.cos, torch.sin)]
        pos[:, :d] = torch.stack(feats, 1)[:, :d] * 4
        model.pos_embed[0, 1:] = pos
        model.patch_embed.proj.weight.mul_(0.05)  # the image moves attention a little, position a lot
        qkv = model.blocks[0].attn.qkv
        for head, sharpness in ((0, 0.12), (1, 0.04)):  # two positional heads, a narrow and a wide one
            rows = slice(head * d, (head + 1) * d)
            for part in (0, DIM):  # the query rows, then the key rows
                qkv.weight[part + head * d: part + (head + 1) * d] = 0
                qkv.weight[part + head * d: part + (head + 1) * d, :d] = torch.eye(d) * math.sqrt(sharpness * 8)
                qkv.bias[part:part + DIM][rows] = 0
    return model


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = positional_vit()
    scores = score_heads(model, [torch.randn(32, 3, GRID * 8, GRID * 8)], progress=False)
    kernel = fit_mixing(scores, 3, "depthwise")["kernel"][0]            # [heads, 3, 3]
    centre = 1 + (GRID // 2) * GRID + GRID // 2                         # the centre patch (after CLS)
    fig, axes = plt.subplots(2, HEADS, figsize=(2.4 * HEADS, 5))
    for h in range(HEADS):
        mean = scores.mean_attention[0, h, centre, 1:].float().reshape(GRID, GRID)
        axes[0, h].imshow(mean, cmap="viridis")
        axes[0, h].set_title(f"head {h}: Sigma_h {scores.sigma_h[0, h]:.3f}", fontsize=9)
        axes[1, h].imshow(kernel[h], cmap="viridis")
        axes[1, h].set_title("fitted 3 x 3 kernel", fontsize=9)
        for ax in axes[:, h]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mean attention\nof the centre patch")
    fig.suptitle("Block 0: heads 0 and 1 attend by position, heads 2 and 3 have random weights")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
