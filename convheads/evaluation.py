"""Classification metrics: top-1, top-5 and mean cross-entropy over a loader."""
from typing import Callable, Dict, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConvHeadsError


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: str = "cpu",
             progress: bool = True) -> Dict[str, float]:
    """{"top1", "top5", "loss", "num_images"}; top-5 is top-k with k = min(5, classes).

    `model` is an nn.Module (in eval mode for the pass, then restored) or any function from a batch
    of images to logits, e.g. a model loaded back from MLflow, which has no train/eval switch."""
    module = model if isinstance(model, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval().to(device)
    n = top1 = top5 = 0
    loss = 0.0
    try:
        for images, labels in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            top1 += (topk[:, 0] == labels).sum().item()
            top5 += (topk == labels[:, None]).any(dim=-1).sum().item()
            n += len(labels)
    finally:
        if module is not None:
            module.train(was_training)
    if n == 0:
        raise ConvHeadsError("the evaluation loader yielded no images")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "num_images": n}
