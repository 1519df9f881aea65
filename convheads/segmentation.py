"""Semantic segmentation on a timm ViT: a linear head on patch features.

The head is DINOv2's linear evaluation head: the patch tokens of one or more blocks (timm's
`forward_intermediates`, final norm applied, prefix tokens dropped), concatenated along channels,
BatchNorm + 1x1 convolution to class logits on the patch grid, bilinearly upsampled to the image.
The backbone stays a plain timm ViT (`model.backbone`), so scoring, replacement, costs and
save/load work on it as on a classifier (convheads.vit.as_vit); a replaced attention layer keeps
the token layout, so every intermediate feature map still comes out.
Its metrics are convheads.engine.evaluation.evaluate_segmentation.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConvHeadsError
from .vit import vit_info

IGNORE_INDEX = 255  # ADE20K's "not labelled"
HEAD_LR_SCALE = 10.0  # the head's learning rate over the backbone's when fine-tuning (convheads.training)


def check_feature_blocks(feature_blocks: Optional[Sequence[int]], depth: int) -> List[int]:
    """The blocks whose outputs feed the head: sorted, distinct, in [0, depth); None: the last block."""
    if feature_blocks is None:
        return [depth - 1]
    blocks = list(feature_blocks)
    bad = [b for b in blocks if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < depth]
    if not blocks or bad or len(set(blocks)) != len(blocks):
        raise ConvHeadsError(f"feature_blocks {blocks} must be distinct block indices in 0..{depth - 1} (the model has "
                             f"{depth} blocks), e.g. [{depth - 1}] for the last block")
    return sorted(blocks)


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv on [B, C, h, w] patch features -> [B, classes, H, W] logits (bilinear)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(self.conv(self.bn(features)), size=size, mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """A timm ViT backbone (num_classes=0) with a LinearHead on the patch tokens of `feature_blocks`."""

    def __init__(self, backbone: nn.Module, num_classes: int, feature_blocks: Optional[Sequence[int]] = None):
        super().__init__()
        info = vit_info(backbone)
        if num_classes < 1:
            raise ConvHeadsError(f"a segmentation model needs at least one class; got num_classes={num_classes}")
        self.backbone = backbone
        self.feature_blocks = check_feature_blocks(feature_blocks, info.depth)
        self.num_classes = num_classes
        self.head = LinearHead(len(self.feature_blocks) * backbone.embed_dim, num_classes)

    @property
    def config(self) -> Dict:
        """What save_model records to rebuild the head."""
        return {"num_classes": self.num_classes, "feature_blocks": list(self.feature_blocks)}

    @property
    def uses_every_parameter(self) -> bool:
        """Whether a forward pass reaches every parameter (DDP must otherwise look for the unused
        ones): not when the head reads an earlier block than the last (the later blocks are not run),
        nor when the backbone has weights for its pooled output (fc_norm, an attention pool)."""
        b = self.backbone
        unused = [*b.blocks[self.feature_blocks[-1] + 1:], b.fc_norm, b.head, getattr(b, "attn_pool", None)]
        return not any(True for m in unused if m is not None for _ in m.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """[B, C, h, w] patch features of each feature block (later blocks are not run)."""
        return self.backbone.forward_intermediates(x, indices=self.feature_blocks, norm=True, stop_early=True,
                                                   output_fmt="NCHW", intermediates_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, classes, H, W] logits."""
        return self.head(torch.cat(self.features(x), dim=1), x.shape[-2:])
