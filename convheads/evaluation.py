"""Classification metrics: top-1, top-5 and mean cross-entropy over a loader."""
import contextlib
from typing import Callable, Dict, Iterable, Iterator, Tuple

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
    n = top1 = top5 = 0
    loss = 0.0
    for images, labels, logits in predictions(model, loader, device, progress):
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += (topk[:, 0] == labels).sum().item()
        top5 += (topk == labels[:, None]).any(dim=-1).sum().item()
        n += len(labels)
    if n == 0:
        raise ConvHeadsError("the evaluation loader yielded no images")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "num_images": n}


def predictions(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: str = "cpu",
                progress: bool = True) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, targets, outputs) per batch of `loader`, on `device`; an nn.Module runs in eval mode
    (restored afterwards), any other function from images to outputs as it is."""
    with _eval_mode(model, device):
        for images, targets in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            images, targets = images.to(device), targets.to(device)
            yield images, targets, model(images)


@contextlib.contextmanager
def _eval_mode(model, device: str) -> Iterator[None]:
    module = model if isinstance(model, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval().to(device)
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)
