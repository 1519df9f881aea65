"""Fine-tuning loop (both stages of METHOD.md section 4): AdamW, warm-up + cosine schedule."""
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConvHeadsError
from .evaluation import evaluate
from .ensemble import EnsembleHeadAttention
from .files import save_torch
from .layers import ReplacedAttention
from .segmentation import HEAD_LR_SCALE, SegmentationModel

TRAINABLE = ("all", "new")


def new_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters replace_heads created: kernels, prefix-token scalars and ensemble head logits."""
    params = []
    for m in model.modules():
        if isinstance(m, ReplacedAttention) and m.variant != "identity":
            params += [m.conv.weight] + ([m.alpha, m.beta] if m.num_prefix_tokens else [])
        if isinstance(m, EnsembleHeadAttention) and not m.folded:
            params.append(m.logits)
    return params


def train(
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Optional[Iterable] = None,
        epochs: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        trainable: str = "all",
        device: str = "cpu",
        progress: bool = True,
        on_epoch: Optional[Callable[[Dict], None]] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        seed: int = 0,
        ignore_index: int = -100,
        validate: Callable[..., Dict] = evaluate,
) -> List[Dict]:
    """Train `model` in place; return one metrics dict per epoch (also passed to `on_epoch`).

    trainable: "all" parameters (default), or only the "new" ones that replace_heads created.
    Kernels and the prefix scalars get no weight decay (they are few and shape the mixing). A
    segmentation model's head trains at HEAD_LR_SCALE x lr.
    checkpoint: a file written after every epoch (model, optimiser, schedule); if it exists when
    training starts, training resumes after its epoch.
    seed: the global torch RNG is reseeded from (seed, epoch) at every epoch, so shuffling,
    augmentation and dropout are reproducible and a resumed run equals an uninterrupted one.
    Classification: labels [B], logits [B, classes], train_top1. Segmentation: masks [B, H, W],
    logits [B, classes, H, W], train_pixel_acc over the pixels not labelled `ignore_index`.
    validate(model, val_loader, device=device, progress=False): the val_* metrics (default: top-1/top-5/loss).
    """
    if trainable not in TRAINABLE:
        raise ConvHeadsError(f"trainable must be one of {TRAINABLE}; got {trainable!r}")
    if epochs < 0:
        raise ConvHeadsError(f"epochs must be >= 0; got {epochs}")
    new = {id(p) for p in new_parameters(model)}
    if trainable == "new" and not new:
        raise ConvHeadsError('trainable="new" but the model has no replaced depthwise heads or ensemble blocks to train')
    for p in model.parameters():
        p.requires_grad_(trainable == "all" or id(p) in new)
    # A segmentation head starts from scratch and must first learn the class priors (a bias of
    # several units): it trains at HEAD_LR_SCALE x the learning rate, as decoders usually do.
    head = {id(p) for p in model.head.parameters()} if isinstance(model, SegmentationModel) else set()
    groups = []
    for in_head in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == in_head]
        decay = [p for p in params if p.ndim >= 2 and id(p) not in new]
        no_decay = [p for p in params if p.ndim < 2 or id(p) in new]
        scale = HEAD_LR_SCALE if in_head else 1.0
        groups += [{"params": decay, "weight_decay": weight_decay, "lr": lr * scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr": lr * scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    steps_per_epoch = len(train_loader)
    total, warmup = max(1, epochs * steps_per_epoch), int(warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (
        (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))))
    model.to(device)
    history: List[Dict] = []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history = state["history"]
        if progress:
            tqdm.write(f"resuming from {checkpoint}: {len(history)} of {epochs} epochs done")
    for epoch in range(len(history), epochs):
        torch.manual_seed(seed * 100_003 + epoch)
        model.train()
        seen = correct = images_seen = 0
        loss_sum = 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise ConvHeadsError(f"training loss became {loss.item()} in epoch {epoch + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            valid = labels != ignore_index
            images_seen += len(labels)
            loss_sum += loss.item() * len(labels)
            seen += valid.sum().item()
            correct += ((logits.argmax(1) == labels) & valid).sum().item()
            bar.set_postfix(loss=f"{loss_sum / images_seen:.3f}", acc=f"{correct / max(1, seen):.3f}")
        accuracy = "train_top1" if labels.ndim == 1 else "train_pixel_acc"
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, images_seen), accuracy: correct / max(1, seen),
               "lr": schedule.get_last_lr()[0]}
        if val_loader is not None:
            row.update({f"val_{k}": v for k, v in validate(model, val_loader, device=device, progress=False).items()
                        if isinstance(v, float)})
        history.append(row)
        if checkpoint is not None:
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "history": history}, checkpoint)
        if progress:
            tqdm.write("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if on_epoch is not None:
            on_epoch(row)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history
