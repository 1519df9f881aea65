"""Self-supervised pretraining by masked image modelling (SimMIM), the way the heads of foundation
models become local.

A random `mask_ratio` of the patches is replaced by a learned mask token at the ViT's input, and a
linear decoder on the last block's patch tokens predicts the masked patches' pixels (L1 on the
normalised pixels; the decoder is thrown away afterwards). To fill in a patch, a head can do no
better than look at its neighbours, which is why MIM-pretrained ViTs (like DINOv2, whose objective
includes masked-token prediction) have the convolution-like heads this project replaces. SimMIM
rather than MAE: the encoder sees every token, as timm's ViT expects, and the decoder is one layer.
The position embedding is MAE's fixed 2-D sin-cos while pretraining (position="sincos"): a head can
tell its neighbours from the first update, where timm's learned embedding, from its random init,
leaves the heads near uniform for longer than a short pretraining on a CPU lasts.

`pretrain` trains for a number of updates; every batch and mask is a function of (seed, update), so
a run resumed from its checkpoint gives the same weights as one that was never interrupted.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.scheduler import create_scheduler_v2
from torch import nn
from tqdm.auto import tqdm

from .errors import ConvHeadsError
from .files import save_torch
from .vit import as_vit, vit_info

POSITIONS = ("sincos", "learned")


@dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    """How to pretrain: updates of batch_size crops with mask_ratio of their patches masked."""
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1.5e-3
    """The peak learning rate (AdamW), after the warm-up; a cosine to 0 follows."""
    weight_decay: float = 0.05
    warmup_steps: int = 100
    mask_ratio: float = 0.5
    """The share of patches hidden behind the mask token, in (0, 1)."""
    position: str = "sincos"
    """sincos: MAE's fixed 2-D sin-cos position embedding while pretraining (learned afterwards), so
    that a head can find its neighbours from the first update | learned: timm's, from its random init."""
    save_every: int = 100
    """Updates between checkpoints (what a killed run resumes from)."""

    def __post_init__(self):
        rules = {"steps": (self.steps >= 1, ">= 1"), "batch_size": (self.batch_size >= 1, ">= 1"),
                 "lr": (self.lr > 0, "> 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
                 "warmup_steps": (0 <= self.warmup_steps < self.steps, "in [0, steps)"),
                 "mask_ratio": (0 < self.mask_ratio < 1, "in (0, 1): a share of the patches, some hidden and "
                                                        "some shown"),
                 "save_every": (self.save_every >= 1, ">= 1"),
                 "position": (self.position in POSITIONS, f"one of {POSITIONS}")}
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ConvHeadsError(f"{name} must be {rule}; got {getattr(self, name)!r}")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, n, patch * patch * C], patches in the ViT's (row-major) token order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def random_masks(batch: int, patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[batch, patches] bool, exactly round(ratio * patches) True per row, at random places."""
    hidden = max(1, min(patches - 1, int(round(ratio * patches))))
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    return order < hidden


class MaskedImageModel(nn.Module):
    """A timm ViT with SimMIM's mask token and linear pixel decoder."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = as_vit(vit)
        info = vit_info(self.vit)
        if info.patch_size[0] != info.patch_size[1]:
            raise ConvHeadsError(f"masked image modelling needs square patches; got {info.patch_size}")
        self.patch = info.patch_size[0]
        dim = self.vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(dim, self.patch * self.patch * 3)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mean L1 error of the masked patches' predicted pixels; images [B, 3, H, W], mask [B, n]."""
        vit = self.vit
        x = vit.patch_embed(images)                                           # [B, n, D]
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))                   # [B, P + n, D]
        x = vit.norm(vit.blocks(x))
        pred = self.decoder(x[:, vit.num_prefix_tokens:])                     # [B, n, patch * patch * 3]
        error = (pred - patchify(images, self.patch)).abs().mean(-1)          # [B, n]
        return (error * mask).sum() / mask.sum()


def pretrain(model: nn.Module, batches: Callable[[int], torch.Tensor], settings: PretrainSettings, *,
             seed: int = 0, checkpoint: Optional[Union[str, Path]] = None, progress: bool = True) -> List[Dict]:
    """Pretrain the ViT `model` in place; return the loss history ({step, loss} every save_every updates).

    batches(step) -> normalised images [batch_size, 3, H, W] for update `step` (a pure function of
    step). checkpoint: written every save_every updates and resumed from if it exists.
    """
    torch.manual_seed(seed)
    mim = MaskedImageModel(model)
    if settings.position == "sincos":
        fix_sincos_position(mim.vit)
    optimizer = torch.optim.AdamW(_groups(mim, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
    schedule, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=settings.steps - settings.warmup_steps,
                                      warmup_epochs=settings.warmup_steps, warmup_lr=settings.lr * 1e-3,
                                      min_lr=0.0, step_on_epochs=False, updates_per_epoch=1)
    done, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["settings"] != settings.__dict__:
            raise ConvHeadsError(f"{checkpoint} was written with other pretraining settings ({state['settings']}); "
                                 f"delete it to start over")
        mim.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done, history = state["step"], state["history"]
        if progress:
            tqdm.write(f"resuming from {checkpoint}: {done} of {settings.steps} updates done")
    mim.train()
    n = mim.vit.patch_embed.num_patches
    running = []
    bar = tqdm(range(done, settings.steps), initial=done, total=settings.steps, desc="pretrain", disable=not progress)
    for step in bar:
        schedule.step_update(step)
        masks = random_masks(settings.batch_size, n, settings.mask_ratio, _generator(seed, step))
        loss = mim(batches(step), masks)
        if not torch.isfinite(loss):
            raise ConvHeadsError(f"the pretraining loss became {loss.item()} at update {step}; lower pretrain.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
            history.append({"step": step + 1, "loss": float(np.mean(running))})
            running = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if checkpoint is not None:
                save_torch({"model": mim.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                            "history": history, "settings": settings.__dict__}, checkpoint)
    mim.vit.pos_embed.requires_grad_(True)  # fine-tuning learns it
    mim.eval()
    return history


def fix_sincos_position(vit: nn.Module) -> None:
    """Set the ViT's patch position embedding to MAE's fixed 2-D sin-cos one (prefix positions 0), frozen."""
    h, w = vit.patch_embed.grid_size
    if getattr(vit, "pos_embed", None) is None or vit.embed_dim % 4:
        raise ConvHeadsError("pretrain.position=sincos needs a learned absolute position embedding and a width "
                             f"divisible by 4 (got {vit.embed_dim}); use pretrain.position=learned")
    with torch.no_grad():
        vit.pos_embed.zero_()
        vit.pos_embed[0, -h * w:] = build_sincos2d_pos_embed([h, w], dim=vit.embed_dim)
    vit.pos_embed.requires_grad_(False)


def _generator(seed: int, step: int) -> torch.Generator:
    """A generator for update `step` alone: the masks do not depend on what ran before."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def _groups(mim: MaskedImageModel, weight_decay: float) -> List[Dict]:
    """Weight decay on matrices only (not on biases, norms, position embeddings or tokens)."""
    decay, rest = [], []
    for name, p in mim.named_parameters():
        (decay if p.ndim > 1 and "pos_embed" not in name and "token" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
