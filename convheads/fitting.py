"""Fit the replacement layers to what each head does on average, and score how well they can.

A head's mean attention E[A] over images (HeadScores) is input-independent by definition; a
variant can keep only the part of it that its mixing represents. For "depthwise_global" with the
k x k window W around each query patch, E[A] is read as a uniform level plus a local excess:

    u          = mean weight from a patch to the patches outside its window (the uniform level)
    gamma      = u * N              (gamma * mean of V over all N tokens: weight u on every token)
    kernel     = mean weight from a patch to its neighbour at offset delta, minus u (inside W)
    beta[j]    = (mean weight from a patch to prefix token j - u) / S
    alpha[j]   = prefix token j's total weight on the patches
    phi[j, j'] = prefix token j's weight on prefix token j'

"depthwise" has no uniform level (u = 0), no gamma and no phi (a prefix token keeps weight 1 on
itself). beta: the layer adds beta * v_prefix to the patch values before the convolution, so a
prefix token's weight on patch p is beta * (the sum of the kernel taps that land on the grid at
p); S is that sum averaged over the patches (the kernel's mass), so the mean weight equals E[A]'s
(the raw mean weight would be too small by S). A head that attends exactly uniformly is reproduced
exactly. Below a mass of BETA_MASS the division is guarded: beta = excess * S / BETA_MASS^2, which
fades to 0 with the mass (continuous at BETA_MASS). Without the guard a near-uniform head under
depthwise_global (kernel ~ 0 once the uniform level is taken out) gets |beta| of 20-40, and beta
scales a prefix token's values, which can have a far larger norm than the patches'.

`fit_scores`: 1 - the total-variation distance between each row of E[A] and the same row of
the matrix the fitted layer computes, averaged over rows: 1 when the variant represents the head's
mean attention exactly, 0 when they share no weight.
"""
import functools
from typing import Dict, Sequence

import torch

from .errors import ConvHeadsError
from .mixers import check_kernel_size
from .mixing import banded_matrix, depthwise_mix
from .scoring import HeadScores

FITTED = ("depthwise", "depthwise_global", "fixed")  # the variants fit_mixing fits
BETA_MASS = 0.05  # below this kernel mass beta is guarded (see the module docstring); |beta| <= excess / BETA_MASS


def _offset_counts(h: int, w: int) -> torch.Tensor:
    """[2h-1, 2w-1]: how many (query, key) patch pairs of an h x w grid have each offset."""
    dy = h - torch.arange(-(h - 1), h, dtype=torch.float64).abs()
    dx = w - torch.arange(-(w - 1), w, dtype=torch.float64).abs()
    return dy[:, None] * dx[None, :]


def _window(counts: torch.Tensor, h: int, w: int, kernel_size: int) -> torch.Tensor:
    """The k x k window of offsets around 0 cut out of a [2h-1, 2w-1] map (zero beyond the grid)."""
    r = kernel_size // 2
    padded = torch.nn.functional.pad(counts, (r, r, r, r))
    return padded[..., h - 1: h + 2 * r, w - 1: w + 2 * r]


def fit_mixing(scores: HeadScores, kernel_size: int, variant: str) -> Dict[str, torch.Tensor]:
    """The fitted parameters of every head, float32: "kernel" [depth, heads, k, k], "alpha", "beta"
    [depth, heads, P], and for "depthwise_global" "gamma" [depth, heads] and "phi" [depth, heads, P, P];
    for "fixed" "attention" [depth, heads, N, N] (E[A] itself). `for_heads` cuts out one block's heads."""
    if variant not in FITTED:
        raise ConvHeadsError(f"an attention fit exists for the variants {FITTED}; got {variant!r}")
    check_kernel_size(kernel_size)
    if variant == "fixed":
        return {"attention": scores.mean_attention.float()}
    (h, w), P = scores.grid_size, scores.num_prefix_tokens
    N = P + h * w
    offsets = scores.offset_attention.double()                          # [D, H, 2h-1, 2w-1]
    counts = _offset_counts(h, w)
    outside = torch.ones_like(counts)
    r = kernel_size // 2
    outside[max(0, h - 1 - r): h + r, max(0, w - 1 - r): w + r] = 0    # the window's offsets
    if variant == "depthwise_global" and (counts * outside).sum() > 0:
        u = (offsets * counts * outside).sum(dim=(-2, -1)) / (counts * outside).sum()
    else:  # no uniform level (or the window covers the whole grid: the band holds everything)
        u = offsets.new_zeros(offsets.shape[:2])
    tap_counts = _window(counts, h, w, kernel_size)                     # 0 for taps beyond the grid
    kernel = (_window(offsets, h, w, kernel_size) - u[..., None, None]) * (tap_counts > 0)
    mass = (kernel * tap_counts).sum(dim=(-2, -1)) / (h * w)            # S: the kernel's mean in-grid sum
    excess = scores.patch_to_prefix.double() - u[..., None]             # [D, H, P]
    guarded = mass.abs() < BETA_MASS
    divisor = torch.where(guarded, torch.full_like(mass, BETA_MASS ** 2), mass ** 2)
    beta = excess * (mass / divisor)[..., None]                         # excess / S, or excess * S / BETA_MASS^2
    fit = {"kernel": kernel, "alpha": scores.prefix_to_patches.double(), "beta": beta}
    if variant == "depthwise_global":
        fit["gamma"] = u * N
        fit["phi"] = scores.prefix_to_prefix.double()
    return {k: v.float() for k, v in fit.items()}


def for_heads(fit: Dict[str, torch.Tensor], block: int, heads: Sequence[int]) -> Dict[str, torch.Tensor]:
    """One block's heads out of `fit_mixing`, in the layer's shapes: kernel [h, k, k], alpha and
    beta [P, h], gamma [h], phi [P, P, h], attention [h, N, N]."""
    heads = list(heads)
    out = {k: v[block, heads] for k, v in fit.items()}
    for name in ("alpha", "beta"):
        if name in out:
            out[name] = out[name].T
    if "phi" in out:
        out["phi"] = out["phi"].permute(1, 2, 0)
    return out


def implied_attention(fit: Dict[str, torch.Tensor], grid_size, num_prefix_tokens: int) -> torch.Tensor:
    """[depth, heads, N, N]: the matrix (rows: queries, columns: keys) through which layers with the
    parameters `fit` mix each head's values, built by the layer's own mixing function."""
    if "attention" in fit:
        return fit["attention"]
    h, w = grid_size
    N = num_prefix_tokens + h * w
    depth, heads, k, _ = fit["kernel"].shape
    out = []
    for b in range(depth):
        f = for_heads(fit, b, range(heads))
        mix = functools.partial(depthwise_mix, weight=f["kernel"][:, None].double(), grid_size=(h, w), head_dim=1,
                                **{n: f[n].double() if n in f else None for n in ("alpha", "beta", "gamma", "phi")})
        matrix = banded_matrix(mix, N, heads, f["kernel"].double())   # [from, to, h]
        out.append(matrix.permute(2, 1, 0))                             # [h, to, from]
    return torch.stack(out).float()


def fit_scores(scores: HeadScores, kernel_size: int = 3, variant: str = "depthwise_global") -> torch.Tensor:
    """[depth, heads] in [0, 1]: how much of each head's mean attention the fitted `variant` keeps
    (1 - mean over query rows of the total-variation distance between E[A] and the fitted matrix)."""
    maps = scores.mean_attention.float()
    implied = implied_attention(fit_mixing(scores, kernel_size, variant), scores.grid_size, scores.num_prefix_tokens)
    return 1 - 0.5 * (maps - implied).abs().sum(dim=-1).mean(dim=-1)
