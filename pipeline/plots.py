"""Figures the stages share: how local each head is, beside its Sigma_h."""
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend on servers and workers


def plot_locality(local: torch.Tensor, sigma_h: torch.Tensor, uniform: float, path: Path, title: str,
                  kernel_size: int = 3) -> None:
    """Two heads x blocks maps: each head's share of attention inside its k x k window (the numbers
    printed; uniform attention's share marked on the colour bar) and its Sigma_h."""
    depth, heads = local.shape
    fig = Figure(figsize=(3 + 1.0 * heads, 1.5 + 0.45 * depth), layout="constrained")
    axes = fig.subplots(1, 2)
    im = axes[0].imshow(local.numpy(), cmap="YlGn", vmin=0, vmax=1, aspect="auto")
    for b in range(depth):
        for h in range(heads):
            axes[0].text(h, b, f"{local[b, h]:.2f}", ha="center", va="center", fontsize=7)
    bar = fig.colorbar(im, ax=axes[0], label=f"share inside {kernel_size} x {kernel_size}")
    bar.ax.axhline(uniform, color="red")
    local_heads = int((local >= 0.5).sum())
    axes[0].set_title(f"locality: {local_heads} of {depth * heads} heads >= 0.5 (uniform {uniform:.2f}, red)")
    im = axes[1].imshow(sigma_h.numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=axes[1], label="Sigma_h (low = convolution-like)")
    axes[1].set_title("Sigma_h")
    for ax in axes:
        ax.set(xlabel="head", ylabel="block", xticks=range(heads), yticks=range(depth))
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
