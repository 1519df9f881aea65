"""How local a head's attention is: the share of its attention that stays in a k x k window.

A head a k x k depthwise convolution can stand in for puts most of its weight on the patches around
the query. local_share measures that from the scores' mean attention E[A]: for each query patch, the
attention mass on the key patches within the k x k window centred on it, averaged over the query
patches (prefix tokens count in the total, never as local). uniform_share is the same for attention
spread evenly over all N tokens: a head must beat it to be local at all.
"""
import torch

from .errors import ConvHeadsError
from .mixers import check_kernel_size
from .scoring import HeadScores


def window(grid_size, kernel_size: int) -> torch.Tensor:
    """[n, n] bool over the n = h * w patches (row-major): key j lies in the k x k window around query i."""
    check_kernel_size(kernel_size)
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    r = kernel_size // 2
    return ((rows[:, None] - rows[None, :]).abs() <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)


def local_share(scores: HeadScores, kernel_size: int = 3) -> torch.Tensor:
    """[depth, heads] float64: the mean over query patches of E[A]'s mass inside the k x k window."""
    P = scores.num_prefix_tokens
    mean = scores.mean_attention.double()                      # [depth, heads, N, N]
    n = mean.shape[-1] - P
    if n != scores.grid_size[0] * scores.grid_size[1]:
        raise ConvHeadsError(f"the scores' mean attention covers {n} patches but their grid is "
                             f"{tuple(scores.grid_size)}; score the model again")
    patches = mean[..., P:, P:]                                # [depth, heads, n, n]: patch queries to patch keys
    inside = window(scores.grid_size, kernel_size).to(patches.dtype)
    return (patches * inside).sum(-1).mean(-1)


def uniform_share(grid_size, num_prefix_tokens: int, kernel_size: int = 3) -> float:
    """local_share of attention spread evenly over all tokens (prefix included)."""
    inside = window(grid_size, kernel_size).sum(-1).double()  # window patches per query (fewer at the edges)
    return float(inside.mean() / (inside.numel() + num_prefix_tokens))
