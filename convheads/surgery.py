"""Model surgery: swap the selected heads of a timm ViT for replacement layers, in place."""
import functools
from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from .ensemble import EnsembleHeadAttention
from .errors import ConvHeadsError
from .fitting import fit_mixing, for_heads
from .folding import FoldedHeadAttention
from .layers import ConvHeadAttention, ReplacedAttention
from .mixers import check_kernel_size
from .scoring import HeadScores
from .selection import Selection
from .vit import as_vit, vit_info

INITS = ("gaussian", "attention")
VARIANTS = ("depthwise", "depthwise_global", "identity", "ensemble", "folded", "fixed", "drop")
# Variants whose layer takes a whole block: all its heads become one mixing.
BLOCK_VARIANTS = ("ensemble", "folded")


@dataclass(frozen=True, kw_only=True)
class ReplaceSettings:
    """How replace_heads replaces the selected heads (see its docstring)."""
    kernel_size: int = 3
    """The depthwise convolution's k (odd: 'same' padding)."""
    init: str = "gaussian"
    """gaussian | attention (fitted to each head's mean attention in the scores)."""
    variant: str = "depthwise"
    """depthwise | depthwise_global (+ a global term per head) | identity | ensemble (whole blocks) | folded (whole
    blocks: one kernel per block, scaled per channel; W_V and W_O fold into one matrix) | fixed (each head's mean
    attention matrix: quadratic, a reference, not deployment) | drop (the heads removed: a control)."""

    def __post_init__(self):
        check_options(self.kernel_size, self.init, self.variant)


def replace_heads(
        model: nn.Module,
        selection: Selection,
        kernel_size: int = 3,
        init: str = "gaussian",
        variant: str = "depthwise",
        scores: Optional[HeadScores] = None,
) -> nn.Module:
    """Replace the selected heads of `model` in place and return it.

    init: "gaussian" (normalised 2-D Gaussian, sigma 1, on every channel; alpha, beta uniform in
    [0, 1) as in the reference; depthwise_global's gamma 0 and phi the identity; "fixed": the
    Gaussian convolution's matrix) or "attention" (fitted to each head's mean attention from
    `scores`, see fitting.py: the kernel from the mean weight per neighbour offset, beta so that a
    prefix token's weight through the kernel matches, alpha from the prefix tokens' weight on the
    patches; "depthwise_global" splits off the uniform level first; "fixed" takes E[A] itself;
    the ensemble variant starts from the block's mean fit; "folded" from the rank-1 projection of the
    block's fitted kernels, see folding.py).
    variant: "depthwise" (k x k depthwise convolution), "depthwise_global" (the same plus a global
    term per head), "identity" (no spatial mixing), "ensemble" (all heads of a block merged into one
    depthwise-convolution head; whole blocks only, see ensemble.py), "folded" (one kernel per block,
    scaled per channel, so that W_V and W_O fold into one matrix for deployment; whole blocks only,
    see folding.py), "fixed" (each head's mean
    attention matrix; quadratic, a reference, not for deployment) or "drop" (the heads removed
    outright, their W_V rows and W_O columns too: the control that says whether the convolution
    earns its keep); see layers.py.
    Everything is checked before the model is touched, so a bad call leaves it unchanged.
    """
    info, vit = vit_info(model), as_vit(model)
    check_replacement(model, selection, kernel_size, init, variant, scores)
    fit = None
    if init == "attention" and variant not in ("identity", "drop"):
        fit = fit_mixing(scores, kernel_size, "depthwise" if variant in BLOCK_VARIANTS else variant)
    layers = {}
    for b, heads in selection.heads.items():  # build every layer first: a bad block leaves the model as it was
        attn = vit.blocks[b].attn
        if variant == "ensemble":
            layers[b] = EnsembleHeadAttention(attn, info.grid_size, info.num_prefix_tokens, kernel_size=kernel_size)
        elif variant == "folded":
            layers[b] = FoldedHeadAttention(attn, info.grid_size, info.num_prefix_tokens, kernel_size=kernel_size)
        else:
            layers[b] = ConvHeadAttention(attn, heads, info.grid_size, info.num_prefix_tokens,
                                          kernel_size=kernel_size, variant=variant)
        if fit is not None:  # else the layer starts from the Gaussian
            layers[b].init_from_fit(for_heads(fit, b, heads))
    for b, layer in layers.items():
        vit.blocks[b].attn = layer
    if info.dynamic_img_size:
        track_grid_size(vit)
    return model


def check_options(kernel_size: int, init: str, variant: str) -> None:
    """The replacement's own settings, whatever the model (what a configuration checks up front)."""
    if variant not in VARIANTS:
        raise ConvHeadsError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if init not in INITS:
        raise ConvHeadsError(f"init must be one of {INITS}; got {init!r}")
    check_kernel_size(kernel_size)


def check_replacement(model: nn.Module, selection: Selection, kernel_size: int, init: str, variant: str,
                      scores: Optional[HeadScores]) -> None:
    """Raise, naming the problem, unless replace_heads can apply these settings to `model`."""
    info, vit = vit_info(model), as_vit(model)
    if not isinstance(selection, Selection):
        raise ConvHeadsError(f"selection must be a convheads.Selection; got {type(selection).__name__}")
    selection.check(info.depth, info.num_heads)
    check_options(kernel_size, init, variant)
    if init == "attention":
        _check_scores(scores, info, variant)
    if variant in BLOCK_VARIANTS:
        partial = {b: hs for b, hs in selection.heads.items() if len(hs) != info.num_heads}
        if partial:
            raise ConvHeadsError(
                f"variant={variant!r} mixes all heads of a block as one, but the selection names only some heads of "
                f"blocks {sorted(partial)}; select whole blocks (select_heads(..., granularity='block') or "
                f"Selection.from_blocks)")
    if not isinstance(getattr(vit, "patch_drop", nn.Identity()), nn.Identity):
        raise ConvHeadsError("patch dropout removes tokens from the patch grid; build the model with "
                             "patch_drop_rate=0 before replacing heads")
    for b in selection.heads:
        if isinstance(vit.blocks[b].attn, ReplacedAttention):
            raise ConvHeadsError(f"block {b} already has replaced heads; select heads on the original model")


def _check_scores(scores: Optional[HeadScores], info, variant: str) -> None:
    if scores is None:
        raise ConvHeadsError('init="attention" needs the scores: replace_heads(..., scores=score_heads(...))')
    if scores.sigma_h.shape != (info.depth, info.num_heads):
        raise ConvHeadsError(
            f"the scores are for a model with {tuple(scores.sigma_h.shape)} blocks x heads, but this model "
            f"has ({info.depth}, {info.num_heads}); score this model")
    if variant == "fixed" and (tuple(scores.grid_size), scores.num_prefix_tokens) != (
            tuple(info.grid_size), info.num_prefix_tokens):
        raise ConvHeadsError(
            f"variant='fixed' takes the scored [N, N] mean attention, but the scores are for "
            f"{scores.num_prefix_tokens} prefix tokens + a {scores.grid_size} patch grid and the model has "
            f"{info.num_prefix_tokens} + {tuple(info.grid_size)}; score the model at the resolution it runs at")


def track_grid_size(vit: nn.Module) -> None:
    """The patch grid follows the input size: tell every replaced layer before the blocks run."""
    if not getattr(vit, "_convheads_grid_hook", False):
        vit.patch_embed.register_forward_pre_hook(functools.partial(_set_grid_size, vit.blocks))
        vit._convheads_grid_hook = True


def _set_grid_size(blocks: nn.ModuleList, patch_embed: nn.Module, args) -> None:
    grid = tuple(patch_embed.dynamic_feat_size(args[0].shape[-2:]))
    for block in blocks:
        if isinstance(block.attn, ReplacedAttention):
            block.attn.grid_size = grid


def replaced_selection(model: nn.Module) -> Selection:
    """The heads of `model` that are replaced, as a Selection."""
    info = vit_info(model)
    blocks = as_vit(model).blocks
    return Selection({i: b.attn.conv_heads for i, b in enumerate(blocks) if isinstance(b.attn, ReplacedAttention)},
                     depth=info.depth, num_heads=info.num_heads)


def replacement_config(model: nn.Module) -> List[dict]:
    """Per replaced block: what replace_heads (and, for a folded layer, fold) needs to rebuild the
    same structure, and the layer's mixing implementation."""
    return [dict(block=i, heads=list(b.attn.conv_heads), kernel_size=b.attn.kernel_size, variant=b.attn.variant,
                 folded=getattr(b.attn, "folded", False), bias_at=getattr(b.attn, "bias_at", None),
                 mixing=b.attn.mixing)
            for i, b in enumerate(as_vit(model).blocks) if isinstance(b.attn, ReplacedAttention)]
