"""What convheads needs to know about a timm VisionTransformer, checked once with clear errors."""
from dataclasses import dataclass
from typing import Tuple

from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import ConvHeadsError
from .layers import ReplacedAttention


@dataclass(frozen=True)
class VitInfo:
    depth: int
    num_heads: int
    head_dim: int
    num_prefix_tokens: int
    grid_size: Tuple[int, int]    # patch grid at the resolution the model was built for
    patch_size: Tuple[int, int]
    img_size: Tuple[int, int]
    dynamic_img_size: bool

    def patch_grid(self, height: int, width: int) -> Tuple[int, int]:
        """The patch grid of a height x width image; errors if the patch size does not divide it."""
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ConvHeadsError(
                f"image size {height} x {width} is not divisible by the patch size {ph} x {pw}; "
                f"resize or crop the images to a multiple of the patch size")
        return height // ph, width // pw

    def grid_for(self, height: int, width: int) -> Tuple[int, int]:
        """The patch grid for an input image; errors on sizes the model cannot take."""
        grid = self.patch_grid(height, width)
        if not self.dynamic_img_size and (height, width) != self.img_size:
            raise ConvHeadsError(
                f"the model was built for {self.img_size[0]} x {self.img_size[1]} images but got "
                f"{height} x {width}; resize the images or build the model with img_size=({height}, {width})")
        return grid


def as_vit(model: nn.Module) -> nn.Module:
    """The timm ViT in `model`: the model itself, or the `backbone` of a model built on one (a
    segmentation model). Scoring, replacement, costs and save/load work on it."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, VisionTransformer) else model


def vit_info(model: nn.Module) -> VitInfo:
    """Check that `model` is (or is built on, see `as_vit`) a timm ViT whose blocks use standard
    attention; describe it."""
    model = as_vit(model)
    if not isinstance(model, VisionTransformer):
        raise ConvHeadsError(
            f"convheads works on timm VisionTransformer models (ViT, DeiT, DINOv2, ...); "
            f"got {type(model).__name__}")
    heads = set()
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, (Attention, ReplacedAttention)):
            raise ConvHeadsError(
                f"block {i} ({type(block).__name__}) has no standard timm Attention module "
                f"(found {type(attn).__name__}); only standard ViT blocks are supported")
        heads.add((attn.num_heads, attn.head_dim))
    if len(heads) != 1:
        raise ConvHeadsError(f"blocks differ in head count or width {sorted(heads)}; not supported")
    (num_heads, head_dim), = heads
    pe = model.patch_embed
    return VitInfo(
        depth=len(model.blocks), num_heads=num_heads, head_dim=head_dim,
        num_prefix_tokens=model.num_prefix_tokens, grid_size=tuple(pe.grid_size),
        patch_size=tuple(pe.patch_size), img_size=tuple(pe.img_size),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)))
