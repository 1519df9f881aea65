"""Semantic segmentation on a timm ViT: a linear head on patch features, and its metrics.

The head is DINOv2's linear evaluation head: the patch tokens of one or more blocks (timm's
`forward_intermediates`, final norm applied, prefix tokens dropped), concatenated along channels,
BatchNorm + 1x1 convolution to class logits on the patch grid, bilinearly upsampled to the image.
The backbone stays a plain timm ViT (`model.backbone`), so scoring, replacement, costs and
save/load work on it as on a classifier (convheads.vit.as_vit); a replaced attention layer keeps
the token layout, so every intermediate feature map still comes out.

Metrics come from torchmetrics: mIoU is its macro Jaccard index (a class absent from both the
prediction and the ground truth is left out of the mean), per-class IoU is NaN for such a class,
pixel accuracy is micro accuracy; pixels labelled `ignore_index` count nowhere.
"""
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import ConvHeadsError
from .evaluation import predictions
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


def segmentation_metrics(num_classes: int, ignore_index: int = IGNORE_INDEX):
    """torchmetrics for a [B, H, W] prediction against a [B, H, W] mask (see the module docstring)."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    return MetricCollection({
        "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
        "iou": MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                      zero_division=float("nan")),
        "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
    })


@torch.no_grad()
def evaluate_segmentation(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, num_classes: int,
                          device: str = "cpu", progress: bool = True, ignore_index: int = IGNORE_INDEX,
                          precision: str = "fp32") -> Dict:
    """{"miou", "pixel_acc", "loss", "iou" (per class, NaN where absent), "num_images"} over (images, masks).

    `model` is an nn.Module (in eval mode for the pass, then restored) or any function from images
    to [B, classes, H, W] logits, e.g. a model loaded back from MLflow. precision: as in
    convheads.evaluation. Inside a process group (torchrun) each process scores its share of the
    loader and the totals (torchmetrics' states too) are gathered: every process gets them."""
    metrics = segmentation_metrics(num_classes, ignore_index).to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # images, labelled pixels, loss
    for images, masks, logits in predictions(model, loader, device, progress, precision):
        sums += torch.stack([torch.tensor(len(images), dtype=torch.float64, device=device),
                             (masks != ignore_index).sum().double(),
                             F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum").double()])
        metrics.update(logits.argmax(1), masks)
    n, pixels, loss = distributed.all_sum(sums).tolist()
    if n == 0:
        raise ConvHeadsError("the evaluation loader yielded no images")
    if pixels == 0:
        raise ConvHeadsError(f"every pixel of the {int(n)} evaluated masks is ignore_index {ignore_index}; nothing to "
                             f"score")
    values = metrics.compute()
    return {"miou": values["miou"].item(), "pixel_acc": values["pixel_acc"].item(), "loss": loss / pixels,
            "iou": values["iou"].tolist(), "num_images": int(n)}
