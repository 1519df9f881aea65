"""Model surgery: swap the selected heads of a timm ViT for replacement layers, in place."""
import functools
from typing import List, Optional

from torch import nn

from .errors import ConvHeadsError
from .ensemble import EnsembleHeadAttention
from .layers import ConvHeadAttention, ReplacedAttention
from .scoring import HeadScores
from .selection import Selection
from .vit import as_vit, vit_info

INITS = ("gaussian", "attention")
VARIANTS = ("depthwise", "identity", "ensemble")


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
    [0, 1) as in the reference) or "attention" (fitted to each head's mean attention, from
    `scores`: kernel[delta] = mean weight from a patch to its neighbour at offset delta,
    beta[j] = mean weight from a patch to prefix token j, alpha[j] = prefix token j's total
    weight on the patches; the ensemble variant starts from their means over the block's heads).
    variant: "depthwise" (k x k depthwise convolution), "identity" (no spatial mixing) or "ensemble"
    (all heads of a block merged into one depthwise-convolution head; whole blocks only, see ensemble.py).
    Everything is checked before the model is touched, so a bad call leaves it unchanged.
    """
    info, vit = vit_info(model), as_vit(model)
    if not isinstance(selection, Selection):
        raise ConvHeadsError(f"selection must be a convheads.Selection; got {type(selection).__name__}")
    selection.check(info.depth, info.num_heads)
    if variant not in VARIANTS:
        raise ConvHeadsError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if init not in INITS:
        raise ConvHeadsError(f"init must be one of {INITS}; got {init!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConvHeadsError(f"kernel_size must be a positive odd integer ('same' padding); got {kernel_size!r}")
    if init == "attention":
        if scores is None:
            raise ConvHeadsError('init="attention" needs the scores: replace_heads(..., scores=score_heads(...))')
        if scores.sigma_h.shape != (info.depth, info.num_heads):
            raise ConvHeadsError(
                f"the scores are for a model with {tuple(scores.sigma_h.shape)} blocks x heads, but this model "
                f"has ({info.depth}, {info.num_heads}); score this model")
    if variant == "ensemble":
        partial = {b: hs for b, hs in selection.heads.items() if len(hs) != info.num_heads}
        if partial:
            raise ConvHeadsError(
                f"variant='ensemble' merges all heads of a block, but the selection names only some heads of "
                f"blocks {sorted(partial)}; select whole blocks (select_heads(..., granularity='block') or "
                f"Selection.from_blocks)")
    if not isinstance(getattr(vit, "patch_drop", nn.Identity()), nn.Identity):
        raise ConvHeadsError("patch dropout removes tokens from the patch grid; build the model with "
                             "patch_drop_rate=0 before replacing heads")
    for b in selection.heads:
        if isinstance(vit.blocks[b].attn, ReplacedAttention):
            raise ConvHeadsError(f"block {b} already has replaced heads; select heads on the original model")

    kernels = scores.kernels(kernel_size) if init == "attention" else None
    layers = {}
    for b, heads in selection.heads.items():  # build every layer first: a bad block leaves the model as it was
        attn = vit.blocks[b].attn
        if variant == "ensemble":
            layers[b] = EnsembleHeadAttention(attn, info.grid_size, info.num_prefix_tokens, kernel_size=kernel_size)
        else:
            layers[b] = ConvHeadAttention(attn, heads, info.grid_size, info.num_prefix_tokens,
                                          kernel_size=kernel_size, variant=variant)
        if variant != "identity" and kernels is not None:  # the layer starts from the Gaussian
            layers[b].init_from_attention(kernels[b, heads], scores.patch_to_prefix[b, heads].T,
                                          scores.prefix_to_patches[b, heads].T)
    for b, layer in layers.items():
        vit.blocks[b].attn = layer
    if info.dynamic_img_size and not getattr(vit, "_convheads_grid_hook", False):
        # The patch grid follows the input size: tell every conv layer before the blocks run.
        vit.patch_embed.register_forward_pre_hook(functools.partial(_set_grid_size, vit.blocks))
        vit._convheads_grid_hook = True
    return model


def _set_grid_size(blocks: nn.ModuleList, patch_embed: nn.Module, args) -> None:
    grid = tuple(patch_embed.dynamic_feat_size(args[0].shape[-2:]))
    for block in blocks:
        if isinstance(block.attn, ReplacedAttention):
            block.attn.grid_size = grid


def replaced_selection(model: nn.Module) -> Selection:
    """The heads of `model` that are replaced, as a Selection."""
    info = vit_info(model)
    return Selection({i: b.attn.conv_heads for i, b in enumerate(as_vit(model).blocks) if isinstance(b.attn, ReplacedAttention)},
                     depth=info.depth, num_heads=info.num_heads)


def replacement_config(model: nn.Module) -> List[dict]:
    """Per replaced block: what replace_heads (and, for a folded ensemble, fold) needs to rebuild the
    same structure."""
    return [dict(block=i, heads=list(b.attn.conv_heads), kernel_size=b.attn.kernel_size, variant=b.attn.variant,
                 folded=getattr(b.attn, "folded", False))
            for i, b in enumerate(as_vit(model).blocks) if isinstance(b.attn, ReplacedAttention)]
