"""Classification metrics: top-1, top-5 and mean cross-entropy over a loader; the evaluation loop
every task's metrics run on (`predictions`)."""
import contextlib
from typing import Callable, Dict, Iterable, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import ConvHeadsError
from .precision import autocast, input_dtype


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: str = "cpu",
             progress: bool = True, precision: str = "fp32") -> Dict[str, float]:
    """{"top1", "top5", "loss", "num_images"}; top-5 is top-k with k = min(5, classes).

    `model` is an nn.Module (in eval mode for the pass, then restored) or any function from a batch
    of images to logits, e.g. a model loaded back from MLflow, which has no train/eval switch.
    Counts and the loss are summed in float64. Inside a process group (torchrun), each process
    evaluates its share of the images (the loader's) and the sums are added over the processes:
    every process gets the totals.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # images, top-1 hits, top-5 hits, loss
    for images, labels, logits in predictions(model, loader, device, progress, precision):
        topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        sums += torch.stack([torch.tensor(len(labels), dtype=torch.float64, device=device),
                             (topk[:, 0] == labels).sum().double(),
                             (topk == labels[:, None]).any(dim=-1).sum().double(),
                             F.cross_entropy(logits, labels, reduction="sum").double()])
    n, top1, top5, loss = distributed.all_sum(sums).tolist()
    if n == 0:
        raise ConvHeadsError("the evaluation loader yielded no images")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "num_images": int(n)}


def predictions(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: str = "cpu",
                progress: bool = True, precision: str = "fp32"
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, targets, float32 outputs) per batch of `loader`, on `device`; an nn.Module runs in
    eval mode (restored afterwards), any other function from images to outputs as it is. Inputs are
    cast to the module's dtype (a model cast to half precision takes half inputs); precision bf16 /
    fp16 runs the forward pass under autocast."""
    module = model if isinstance(model, nn.Module) else None
    dtype = input_dtype(module) if module is not None else torch.float32
    with _eval_mode(module, device):
        for images, targets in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            images, targets = images.to(device, dtype), targets.to(device)
            with autocast(precision, device):
                outputs = model(images)
            yield images, targets, outputs.float()


@contextlib.contextmanager
def _eval_mode(module, device: str) -> Iterator[None]:
    was_training = module is not None and module.training
    if module is not None:
        module.eval().to(device)
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)
