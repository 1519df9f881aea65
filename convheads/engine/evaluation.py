"""Metrics of a model over a loader: classification (top-1, top-5, loss) and segmentation (mIoU,
pixel accuracy, per-class IoU, loss), on one process or summed exactly over a process group.

`model` is an nn.Module (in eval mode for the pass, then restored) or any function from a batch of
images to logits, e.g. a model loaded back from MLflow, which has no train/eval switch.
Segmentation metrics come from torchmetrics: mIoU is its macro Jaccard index (a class absent from
both the prediction and the ground truth is left out of the mean), per-class IoU is NaN for such
a class, pixel accuracy is micro accuracy; pixels labelled `ignore_index` count nowhere.
"""
from typing import Callable, Dict, Iterable, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConvHeadsError
from ..modes import eval_mode
from ..precision import autocast, input_dtype
from ..segmentation import IGNORE_INDEX
from . import distributed

Model = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate(model: Model, loader: Iterable, device: str = "cpu", progress: bool = True,
             precision: str = "fp32", per_image: bool = False) -> Dict:
    """{"top1", "top5", "loss", "num_images"}; top-5 is top-k with k = min(5, classes).

    Counts and the loss are summed in float64. Inside a process group (torchrun), each process
    evaluates its share of the images (the loader's) and the sums are added over the processes:
    every process gets the totals. per_image: also "predicted" and "labels", int64 [num_images] in
    the loader's order (one process): what paired comparisons of two models on the same images need.
    """
    if per_image and distributed.world_size() > 1:
        raise ConvHeadsError("per-image predictions are kept on one process; evaluate outside torchrun")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # images, top-1 hits, top-5 hits, loss
    kept = []
    for images, labels, logits in predictions(model, loader, device, progress, precision):
        topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        if per_image:
            kept.append(torch.stack([topk[:, 0], labels]).cpu())
        sums += torch.stack([torch.tensor(len(labels), dtype=torch.float64, device=device),
                             (topk[:, 0] == labels).sum().double(),
                             (topk == labels[:, None]).any(dim=-1).sum().double(),
                             F.cross_entropy(logits, labels, reduction="sum").double()])
    n, top1, top5, loss = distributed.all_sum(sums).tolist()
    if n == 0:
        raise ConvHeadsError("the evaluation loader yielded no images")
    metrics = {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "num_images": int(n)}
    if per_image:
        metrics["predicted"], metrics["labels"] = torch.cat(kept, dim=1)
    return metrics


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
def evaluate_segmentation(model: Model, loader: Iterable, num_classes: int, device: str = "cpu",
                          progress: bool = True, ignore_index: int = IGNORE_INDEX,
                          precision: str = "fp32") -> Dict:
    """{"miou", "pixel_acc", "loss", "iou" (per class, NaN where absent), "num_images"} over (images,
    masks) with logits [B, classes, H, W]. Inside a process group each process scores its share of
    the loader and the totals (torchmetrics' states too) are gathered: every process gets them."""
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


def predictions(model: Model, loader: Iterable, device: str = "cpu", progress: bool = True,
                precision: str = "fp32") -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, targets, float32 outputs) per batch of `loader`, on `device`; an nn.Module runs in
    eval mode (restored afterwards), any other function from images to outputs as it is. Inputs are
    cast to the module's dtype (a model cast to half precision takes half inputs); precision bf16 /
    fp16 runs the forward pass under autocast."""
    module = model.to(device) if isinstance(model, nn.Module) else None
    dtype = input_dtype(module) if module is not None else torch.float32
    with eval_mode(module):
        for images, targets in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            images, targets = images.to(device, dtype), targets.to(device)
            with autocast(precision, device):
                outputs = model(images)
            yield images, targets, outputs.float()
