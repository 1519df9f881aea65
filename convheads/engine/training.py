"""The training engine: fine-tuning for both stages of the method (baseline and recovery).

Built from timm's parts: AdamW from `create_optimizer_v2` (no weight decay on 1-D parameters, on
what `model.no_weight_decay()` names -- position embedding, CLS and register tokens -- nor on the
replaced layers' new parameters; optional layer-wise lr decay), a cosine schedule with warm-up
from `create_scheduler_v2`, stepped per update, and an optional EMA of the weights (`ModelEmaV3`).
On top: bf16 / fp16 autocast (fp16 with gradient scaling), gradient accumulation, clipping and
checkpointing, and data parallelism (DDP) when the process runs under torchrun
(convheads.engine.distributed): gradients are averaged over the processes, rank 0 alone writes the
checkpoint, and validation is sharded over the processes and summed exactly.

Both tasks train here: classification (labels [B], logits [B, classes]) and segmentation (masks
[B, H, W], logits [B, classes, H, W]; pixels labelled `ignore_index` count nowhere). A task head
built on the backbone (convheads.segmentation) starts from scratch and trains at HEAD_LR_SCALE x lr.
"""
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..dsp import gate_groups
from ..ensemble import EnsembleHeadAttention
from ..errors import ConvHeadsError
from ..files import save_torch
from ..layers import ReplacedAttention
from ..precision import autocast, check_precision, input_dtype
from ..segmentation import HEAD_LR_SCALE
from ..vit import as_vit
from . import distributed
from .evaluation import evaluate

TRAINABLE = ("all", "new")
LOG_EVERY = 10  # updates between progress-bar refreshes: the only host syncs inside an epoch


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How to fine-tune: the same for the baseline and for recovery."""
    epochs: int = 10
    lr: float = 1e-3
    """The peak learning rate (AdamW), after the warm-up."""
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    """A linear warm-up over this many epochs, then a cosine from lr to 0."""
    label_smoothing: float = 0.0
    trainable: str = "all"
    """all | new: only what replace_heads created (kernels, prefix scalars, ensemble weights)."""
    accumulation: int = 1
    """Micro-batches per update: the gradients of this many steps add up."""
    clip_grad: Optional[float] = None
    """Clip the gradients' global norm to this."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass: ~30% more compute, far less memory."""
    ema_decay: Optional[float] = None
    """Keep an EMA of the weights with this decay (e.g. 0.999); it is validated and kept at the end."""
    layer_decay: Optional[float] = None
    """Layer-wise lr decay (timm's), e.g. 0.75: each block's lr x 0.75 per block from the top."""

    def __post_init__(self):
        rules = {"epochs": (self.epochs >= 0, ">= 0"), "lr": (self.lr > 0, "> 0"),
                 "weight_decay": (self.weight_decay >= 0, ">= 0"), "warmup_epochs": (self.warmup_epochs >= 0, ">= 0"),
                 "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
                 "trainable": (self.trainable in TRAINABLE, f"one of {TRAINABLE}"),
                 "accumulation": (self.accumulation >= 1, ">= 1"),
                 "clip_grad": (self.clip_grad is None or self.clip_grad > 0, "> 0 or None"),
                 "ema_decay": (self.ema_decay is None or 0 < self.ema_decay < 1, "in (0, 1) or None"),
                 "layer_decay": (self.layer_decay is None or 0 < self.layer_decay <= 1, "in (0, 1] or None")}
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ConvHeadsError(f"{name} must be {rule}; got {getattr(self, name)!r}")


def new_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters replace_heads created: kernels, prefix-token scalars and ensemble head logits."""
    params = []
    for m in model.modules():
        if isinstance(m, ReplacedAttention):
            params += m.mixing_parameters()
        if isinstance(m, EnsembleHeadAttention) and not m.folded:
            params.append(m.logits)
    return params + [p for g in gate_groups(model) for p in g["params"]]


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> List[Dict]:
    """timm's parameter groups (weight decay, or weight decay and layer-wise lr scales), with the
    replaced layers' new parameters among the ones without weight decay: they are few and shape
    the mixing (a kernel pulled towards zero mixes nothing). A model built on a ViT backbone (a
    segmentation model): the backbone's groups, as timm makes them for it, and the head's at
    HEAD_LR_SCALE x lr -- a head from scratch must first move its biases to the class priors.
    DSP gates (convheads.dsp) get a group of their own: their lr, no weight decay."""
    vit = as_vit(model)
    gates = gate_groups(model)
    own = {id(p) for g in gates for p in g["params"]}
    new = {id(p) for p in new_parameters(vit)}
    no_decay = set(getattr(vit, "no_weight_decay", lambda: set())())
    no_decay |= {name for name, p in vit.named_parameters() if id(p) in new}
    if layer_decay is not None:
        groups = param_groups_layer_decay(vit, weight_decay=weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=no_decay)
    else:
        groups = param_groups_weight_decay(vit, weight_decay=weight_decay, no_weight_decay_list=no_decay)
    if vit is not model:
        inside = {id(p) for p in vit.parameters()} | own
        head = [p for p in model.parameters() if id(p) not in inside and p.requires_grad]
        groups += [{"params": [p for p in head if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": HEAD_LR_SCALE},
                   {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": HEAD_LR_SCALE}]
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in own]} for g in groups]
    return [g for g in groups if g["params"]] + gates


@dataclass
class _Optimisation:
    """What one training run updates besides the model: optimiser, schedule, loss scaler, EMA."""
    optimizer: torch.optim.Optimizer
    schedule: object
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEmaV3]
    updates_per_epoch: int


def train(
        model: nn.Module,
        train_loader: Iterable,
        settings: TrainSettings = TrainSettings(),
        val_loader: Optional[Iterable] = None,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        seed: int = 0,
        checkpoint: Optional[Union[str, Path]] = None,
        progress: bool = True,
        on_epoch: Optional[Callable[[Dict], None]] = None,
        ignore_index: int = -100,
        validate: Callable[..., Dict] = evaluate,
) -> List[Dict]:
    """Train `model` in place with `settings`; return one metrics dict per epoch (also passed to `on_epoch`).

    train_loader yields micro-batches; `settings.accumulation` of them make one update (an
    incomplete last update is dropped). convheads.data.loaders.make_loader(drop_last=True, ...)
    builds one per process. precision: fp32, bf16 or fp16 (autocast; fp16 scales the loss and
    needs a GPU). checkpoint: a file written after every epoch (model, optimiser, EMA, loss scaler);
    if it exists when training starts, training resumes after its epoch, with any number of
    processes. seed: the global torch RNG is reseeded from (seed, epoch) at every epoch, so
    shuffling, augmentation and dropout are reproducible and a resumed run equals an uninterrupted
    one. Under torchrun (convheads.engine.distributed.setup) the processes train one model
    together (DDP). Targets labelled `ignore_index` (segmentation: unlabelled pixels) count
    nowhere; the row's accuracy is train_top1 for labels [B], train_pixel_acc for masks [B, H, W].
    validate(model, val_loader, device=, progress=, precision=): the val_* metrics (its float
    values; default: convheads.engine.evaluation.evaluate's top-1, top-5 and loss).
    """
    updates_per_epoch = _check(model, train_loader, settings, device, precision)
    new = {id(p) for p in new_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(settings.trainable == "all" or id(p) in new)
    model.to(device)
    run = _optimisation(model, settings, updates_per_epoch, device, precision)
    history = _resume(checkpoint, model, run, device, settings.epochs, progress)
    if settings.grad_checkpointing:
        model.set_grad_checkpointing(True)
    net = (DistributedDataParallel(model, device_ids=[torch.device(device).index]
                                   if torch.device(device).type == "cuda" else None,
                                   find_unused_parameters=not getattr(model, "uses_every_parameter", True))
           if distributed.active() else model)
    main = distributed.is_main()
    try:
        for epoch in range(len(history), settings.epochs):
            torch.manual_seed(seed * 100_003 + epoch)  # the same on every process: the same data order
            row = _train_epoch(net, model, train_loader, run, settings, epoch, device, precision, ignore_index,
                               progress and main)
            if val_loader is not None:
                scored = run.ema.module if run.ema is not None else model
                row.update({f"val_{k}": v for k, v in validate(scored, val_loader, device=device, progress=False,
                                                                precision=precision).items() if isinstance(v, float)})
            history.append(row)
            if checkpoint is not None and main:
                _save(checkpoint, model, run, history)
            if progress and main:
                tqdm.write("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if on_epoch is not None and main:
                on_epoch(row)
    finally:
        if settings.grad_checkpointing:
            model.set_grad_checkpointing(False)
        for p in model.parameters():
            p.requires_grad_(True)
    if run.ema is not None:
        model.load_state_dict(run.ema.module.state_dict())
    model.eval()
    return history


def _check(model: nn.Module, train_loader: Iterable, settings: TrainSettings, device: str, precision: str) -> int:
    """Raise on what cannot train; return the updates per epoch."""
    if not isinstance(settings, TrainSettings):
        raise ConvHeadsError(f"settings must be a convheads TrainSettings; got {type(settings).__name__}")
    check_precision(precision, device)
    if settings.trainable == "new" and not new_parameters(model):
        raise ConvHeadsError('trainable="new" but the model has no replaced depthwise heads or ensemble blocks '
                             'to train')
    if settings.grad_checkpointing and not hasattr(model, "set_grad_checkpointing"):
        raise ConvHeadsError(f"{type(model).__name__} has no set_grad_checkpointing (timm models do)")
    updates_per_epoch = len(train_loader) // settings.accumulation
    if settings.epochs and updates_per_epoch == 0:
        raise ConvHeadsError(f"the training loader yields {len(train_loader)} batches, fewer than one update "
                             f"({settings.accumulation} accumulation steps)")
    return updates_per_epoch


def _optimisation(model: nn.Module, s: TrainSettings, updates_per_epoch: int, device: str,
                  precision: str) -> _Optimisation:
    optimizer = create_optimizer_v2(model, "adamw", lr=s.lr, weight_decay=s.weight_decay,
                                    param_group_fn=lambda m: param_groups(m, s.weight_decay, s.layer_decay))
    schedule = None
    if s.epochs:  # counted in updates: a linear warm-up, then a cosine from lr to 0 over the remaining updates
        total = s.epochs * updates_per_epoch
        warmup = min(round(s.warmup_epochs * updates_per_epoch), total - 1)
        schedule, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=total - warmup, warmup_epochs=warmup,
                                          warmup_prefix=True, step_on_epochs=False, updates_per_epoch=1)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    ema = ModelEmaV3(model, decay=s.ema_decay) if s.ema_decay else None
    return _Optimisation(optimizer, schedule, scaler, ema, updates_per_epoch)


def _train_epoch(net: nn.Module, model: nn.Module, loader: Iterable, run: _Optimisation, s: TrainSettings,
                 epoch: int, device: str, precision: str, ignore_index: int, progress: bool) -> Dict:
    """One pass over `loader`: `run.updates_per_epoch` updates; the epoch's training metrics."""
    model.train()
    started = time.perf_counter()
    dtype = input_dtype(model)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x images, correct, targets, images
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{s.epochs}", unit="batch", disable=not progress, leave=False)
    for i, (images, labels) in enumerate(bar):
        if i == run.updates_per_epoch * s.accumulation:
            break
        images = images.to(device, dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        last = (i + 1) % s.accumulation == 0
        # Between updates, gradients accumulate locally; DDP averages them once, at the last.
        with net.no_sync() if net is not model and not last else contextlib.nullcontext():
            with autocast(precision, device):
                logits = net(images)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                                   label_smoothing=s.label_smoothing)
            run.scaler.scale(loss / s.accumulation).backward()
        valid = labels != ignore_index
        sums += torch.stack([loss.detach().double() * len(labels),
                             ((logits.detach().argmax(1) == labels) & valid).sum().double(),
                             valid.sum().double(), sums.new_tensor(len(labels))])
        if not last:
            continue
        _update(model, run.optimizer, run.scaler, s.clip_grad)
        updates = epoch * run.updates_per_epoch + (i + 1) // s.accumulation
        run.schedule.step_update(updates)
        if run.ema is not None:
            run.ema.update(model, step=updates)
        if progress and (i + 1) // s.accumulation % LOG_EVERY == 0:
            loss_sum, correct, targets, seen = sums.tolist()
            _check_finite(loss_sum, epoch)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / max(1, targets):.3f}")
    loss_sum, correct, targets, seen = distributed.all_sum(sums).tolist()
    seconds = time.perf_counter() - started
    _check_finite(loss_sum, epoch)
    accuracy = "train_top1" if labels.ndim == 1 else "train_pixel_acc"
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), accuracy: correct / max(1, targets),
            "lr": max(g["lr"] / (g.get("lr_scale") or 1.0) for g in run.optimizer.param_groups),  # the schedule's
            "train_seconds": seconds, "train_images_per_sec": seen / seconds}


def _save(checkpoint, model: nn.Module, run: _Optimisation, history: List[Dict]) -> None:
    save_torch({"model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(), "ema": run.ema.module.state_dict() if run.ema is not None else None,
                "history": history, "updates_per_epoch": run.updates_per_epoch,
                "world_size": distributed.world_size()}, checkpoint)


def _update(model: nn.Module, optimizer, scaler, clip_grad: Optional[float]) -> None:
    """One optimiser step from the accumulated (and, over processes, averaged) gradients."""
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _check_finite(loss_sum: float, epoch: int) -> None:
    if not torch.isfinite(torch.tensor(loss_sum)):
        raise ConvHeadsError(f"training loss became {loss_sum} in epoch {epoch + 1}; lower the learning rate")


def _resume(checkpoint, model: nn.Module, run: _Optimisation, device: str, epochs: int,
            progress: bool) -> List[Dict]:
    """Load `checkpoint` if it exists (on every process); return the history it holds."""
    state = None
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
    done = len(state["history"]) if state else 0
    if not distributed.same_everywhere(done, device):
        raise ConvHeadsError(f"the processes find different numbers of finished epochs in {checkpoint} (process "
                             f"{distributed.rank()}: {done}): every machine must see the same checkpoint (put the "
                             f"outputs folder on a filesystem they share)")
    if state is None:
        return []
    if state["updates_per_epoch"] != run.updates_per_epoch:
        raise ConvHeadsError(
            f"{checkpoint} was written with {state['updates_per_epoch']} updates per epoch, this run has "
            f"{run.updates_per_epoch}: a different global batch (batch size per process x {state['world_size']} "
            f"processes then, x {distributed.world_size()} now, x accumulation steps). Resume with the same global "
            f"batch, or delete the checkpoint to start over")
    model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.step_update(done * run.updates_per_epoch)  # the schedule is a function of the update count
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        if state["ema"] is None:
            raise ConvHeadsError(f"{checkpoint} has no EMA weights but this run keeps an EMA; delete the checkpoint "
                                 f"to start over")
        run.ema.module.load_state_dict(state["ema"])
    if progress and distributed.is_main():
        tqdm.write(f"resuming from {checkpoint}: {done} of {epochs} epochs done (written by {state['world_size']} "
                   f"process{'es' if state['world_size'] > 1 else ''}, now {distributed.world_size()})")
    return state["history"]
