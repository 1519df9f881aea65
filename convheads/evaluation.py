"""Classification metrics: top-1, top-5 and mean cross-entropy over a loader."""
from typing import Callable, Dict, Iterable

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
    Inputs are cast to the module's dtype (a model cast to half precision takes half inputs);
    precision bf16 / fp16 runs the forward pass under autocast. Counts and the loss are summed in
    float64. Inside a process group (torchrun), each process evaluates its share of the images
    (the loader's) and the sums are added over the processes: every process gets the totals.
    """
    module = model if isinstance(model, nn.Module) else None
    was_training = module is not None and module.training
    dtype = input_dtype(module) if module is not None else torch.float32
    if module is not None:
        module.eval().to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # images, top-1 hits, top-5 hits, loss
    try:
        for images, labels in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            images, labels = images.to(device, dtype), labels.to(device)
            with autocast(precision, device):
                logits = model(images)
            logits = logits.float()
            topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            sums += torch.stack([torch.tensor(len(labels), dtype=torch.float64, device=device),
                                 (topk[:, 0] == labels).sum().double(),
                                 (topk == labels[:, None]).any(dim=-1).sum().double(),
                                 F.cross_entropy(logits, labels, reduction="sum").double()])
    finally:
        if module is not None:
            module.train(was_training)
    n, top1, top5, loss = distributed.all_sum(sums).tolist()
    if n == 0:
        raise ConvHeadsError("the evaluation loader yielded no images")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "num_images": int(n)}
