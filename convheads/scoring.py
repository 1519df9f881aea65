"""Head scoring: how much each head's attention map varies from image to image.

Sigma_h, a head's score, is the sum over (query, key) of the standard deviation of its attention
weight A[query, key] over images: 0 for a head that attends the same way whatever the image, as a
convolution does. Sigma_b, a block's, is the mean of its heads'. tokens="patches" (the default)
sums over patch queries and patch keys only, as the reference implementation does (without the
CLS token): the convolution replaces the patch-to-patch mixing, while the prefix tokens' rows and
columns are handled by the layer's prefix scalars, and a CLS row that varies from image to image
would otherwise count against a head whose patch mixing is perfectly fixed. tokens="all" sums over
every (query, key) pair.

A streaming per-element mean and variance of every block's attention probabilities is kept over
images (Chan/Welford merge, float64, Bessel's correction), so memory is
O(blocks x heads x tokens^2) whatever the number of images. Fused attention kernels do not expose
the probabilities, so a pre-hook on each attention module recomputes them explicitly from the
module's own Q/K weights under no_grad; the model's computation is untouched.
"""
from dataclasses import MISSING, dataclass, fields
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConvHeadsError
from .layers import ReplacedAttention
from .modes import eval_mode
from .precision import autocast, input_dtype
from .vit import as_vit, vit_info

SIGMA_TOKENS = ("patches", "all")


@dataclass
class HeadScores:
    """Scores of every head of a model, plus what the attention-fitted kernel init needs."""
    sigma_h: torch.Tensor            # [depth, heads] float64: sum over (query, key) of the std of A
    offset_attention: torch.Tensor   # [depth, heads, 2h-1, 2w-1] float64, see below
    patch_to_prefix: torch.Tensor    # [depth, heads, P]: mean attention from a patch to prefix token j
    prefix_to_patches: torch.Tensor  # [depth, heads, P]: mean total attention from prefix token j to all patches
    prefix_to_prefix: torch.Tensor   # [depth, heads, P, P]: mean attention from prefix j to j'
    # [depth, heads, N, N] float16: the mean attention E[A] itself (rows: queries, columns: keys), for
    # the fit scores, the "depthwise_global" fit and the "fixed" variant. Half precision halves the
    # file: 4 bytes per block x head x N^2, e.g. 260 MB for ViT-L/14 at 336 px with 4 registers
    # (24 x 16 x 581^2).
    mean_attention: torch.Tensor
    num_images: int
    grid_size: Tuple[int, int]
    num_prefix_tokens: int
    sigma_tokens: str = "all"        # what sigma_h sums over: "patches" (patch pairs) or "all" (every pair)

    # offset_attention[b, i, h-1+dy, w-1+dx] is the mean attention weight, over images and over
    # the query patches p whose neighbour p + (dy, dx) lies on the grid, from p to that neighbour.
    # All means are over images too; together they fit ConvHeadAttention's kernel, beta and alpha.

    @property
    def sigma_b(self) -> torch.Tensor:
        """[depth] float64: mean Sigma_h over each block's heads."""
        return self.sigma_h.mean(dim=1)

    @property
    def depth(self) -> int:
        return self.sigma_h.shape[0]

    @property
    def num_heads(self) -> int:
        return self.sigma_h.shape[1]

    def kernels(self, kernel_size: int) -> torch.Tensor:
        """[depth, heads, k, k] attention-fitted kernels: kernel[delta] = mean attention to p + delta.

        Offsets beyond the patch grid (a kernel larger than the grid) get weight 0.
        """
        r = kernel_size // 2
        h, w = self.grid_size
        padded = F.pad(self.offset_attention, (r, r, r, r))
        return padded[..., h - 1: h + 2 * r, w - 1: w + 2 * r].float()

    def to_dict(self) -> dict:
        return {**self.__dict__, "grid_size": list(self.grid_size)}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadScores":
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ConvHeadsError(f"a score file without {', '.join(missing)}: it was written by another version of "
                                 f"convheads; score the model again (score_heads, or the score stage)")
        return cls(**{**d, "num_images": int(d["num_images"]), "grid_size": tuple(d["grid_size"]),
                      "num_prefix_tokens": int(d["num_prefix_tokens"])})


class _RunningMoments:
    """Per-element running mean and sum of squared deviations of a stream of [heads, N, N] maps."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def update(self, maps: torch.Tensor) -> None:
        """Merge a batch [B, heads, N, N] (Chan et al.'s parallel form of Welford's update)."""
        maps = maps.double()
        nb = maps.shape[0]
        mean_b = maps.mean(dim=0)
        m2_b = ((maps - mean_b) ** 2).sum(dim=0)
        if self.count == 0:
            self.mean, self.m2 = mean_b, m2_b
        else:
            total = self.count + nb
            delta = mean_b - self.mean
            self.mean += delta * (nb / total)
            self.m2 += m2_b + delta**2 * (self.count * nb / total)
        self.count += nb

    def std(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1)).sqrt()


def _attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm's unfused Attention path computes as `attn` (before dropout): [B, H, N, N]."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _offset_means(mean_maps: torch.Tensor, grid: Tuple[int, int], num_prefix: int) -> torch.Tensor:
    """[H, N, N] mean attention -> [H, 2h-1, 2w-1] mean weight per relative patch offset."""
    h, w = grid
    patch = mean_maps[:, num_prefix:, num_prefix:]  # [H, hw (query), hw (key)]
    y = torch.arange(h, device=patch.device).repeat_interleave(w)
    x = torch.arange(w, device=patch.device).repeat(h)
    # Flat index of offset (key - query) in the (2h-1) x (2w-1) map, for every (query, key) pair.
    offset = ((y[None, :] - y[:, None] + h - 1) * (2 * w - 1) + (x[None, :] - x[:, None] + w - 1)).flatten()
    size = (2 * h - 1) * (2 * w - 1)
    sums = patch.new_zeros(patch.shape[0], size).index_add_(1, offset, patch.reshape(patch.shape[0], -1))
    counts = torch.bincount(offset, minlength=size).to(patch.dtype)
    return (sums / counts).reshape(-1, 2 * h - 1, 2 * w - 1)


def _images(batches: Iterable) -> Iterable[torch.Tensor]:
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ConvHeadsError(
                "batches must yield image tensors [B, 3, H, W] or (images, labels) pairs; got "
                f"{type(images).__name__}{'' if not isinstance(images, torch.Tensor) else list(images.shape)}")
        yield images


@torch.no_grad()
def score_heads(
        model: nn.Module,
        batches: Iterable,
        max_images: Optional[int] = 1000,
        progress: bool = True,
        precision: str = "fp32",
        tokens: str = "patches",
) -> HeadScores:
    """Score every attention head of a timm ViT on up to `max_images` images (see the module docstring).

    batches: an iterable of image tensors [B, 3, H, W] or of (images, labels) pairs, e.g. a DataLoader.
    The model runs in eval mode; its previous mode is restored afterwards. precision bf16 / fp16
    computes the attention maps under autocast (in low precision); their statistics are
    accumulated in float64 whatever the precision. tokens: "patches" | "all", what Sigma_h sums over.
    """
    if tokens not in SIGMA_TOKENS:
        raise ConvHeadsError(f"tokens must be one of {SIGMA_TOKENS}; got {tokens!r}")
    info, model = vit_info(model), as_vit(model)  # a segmentation model: its backbone's heads
    if any(isinstance(b.attn, ReplacedAttention) for b in model.blocks):
        raise ConvHeadsError("the model already has replaced heads; score the model before replace_heads")
    if max_images is not None and max_images < 2:
        raise ConvHeadsError(f"max_images must be at least 2 (a variance needs two images); got {max_images}")
    device, dtype = next(model.parameters()).device, input_dtype(model)
    moments = [_RunningMoments() for _ in model.blocks]
    hooks = [
        block.attn.register_forward_pre_hook(
            lambda module, args, m=m: m.update(_attention_probs(module, args[0])))
        for block, m in zip(model.blocks, moments)
    ]
    seen, grid = 0, None
    try:
        with eval_mode(model), tqdm(total=max_images, desc="scoring heads", unit="img", disable=not progress) as bar:
            for images in _images(batches):
                if max_images is not None:
                    images = images[: max_images - seen]
                if len(images) == 0:
                    continue
                g = info.grid_for(*images.shape[-2:])
                if grid is not None and g != grid:
                    raise ConvHeadsError(f"all scoring images must have one size; got grids {grid} and {g}")
                grid = g
                with autocast(precision, device):
                    model.forward_features(images.to(device, dtype))
                seen += len(images)
                bar.update(len(images))
                if max_images is not None and seen >= max_images:
                    break
    finally:
        for hook in hooks:
            hook.remove()
    if seen < 2:
        raise ConvHeadsError(
            f"scoring needs at least 2 images and the batches yielded {seen}; pass a non-empty dataset")
    P = info.num_prefix_tokens
    means = torch.stack([m.mean for m in moments])  # [depth, H, N, N]
    return HeadScores(
        sigma_h=torch.stack([_sigma(m.std(), P if tokens == "patches" else 0) for m in moments]).cpu(),
        offset_attention=torch.stack([_offset_means(m, grid, P) for m in means]).cpu(),
        patch_to_prefix=means[..., P:, :P].mean(dim=-2).cpu(),
        prefix_to_patches=means[..., :P, P:].sum(dim=-1).cpu(),
        num_images=seen, grid_size=grid, num_prefix_tokens=P, prefix_to_prefix=means[..., :P, :P].cpu(),
        mean_attention=means.half().cpu(), sigma_tokens=tokens)


def _sigma(std: torch.Tensor, skip: int) -> torch.Tensor:
    """[heads]: the sum of std [heads, N, N] over (query, key), without the first `skip` rows and columns."""
    return std[..., skip:, skip:].sum(dim=(-2, -1))
