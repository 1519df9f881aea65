"""Analytic cost of a model: parameters and multiply-accumulates (MACs) per image.

Fused attention (scaled_dot_product_attention) is invisible to most FLOP counters, so the two
token-by-token matmuls (Q K^T and A V: 2 N^2 d MACs per head) are counted explicitly, and so are
a replaced layer's depthwise convolution (k^2 MACs per patch and channel, whichever
implementation runs it, see mixing.py; the folded variant's shared kernel alike) and a "fixed"
head's matrix product (N^2 d MACs, the A V half of attention). Counted: Linear and Conv2d layers
and those. Not counted: elementwise work (norms, softmax, activations, the prefix-token scalars,
the global term's mean and add: about 2 N per channel; the folded variant's rank-1 bias map: N per
channel, where no value shift carries it, see folding.py), which is small next to them.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from timm.layers import Attention
from torch import nn

from .ensemble import EnsembleHeadAttention
from .layers import ReplacedAttention
from .mixers import DepthwiseMixer, FixedMixer, SharedKernelMixer
from .modes import eval_mode
from .vit import as_vit, vit_info


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int            # per image
    attention_macs: int  # the part of `macs` spent in Q K^T and A V

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def model_cost(model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> ModelCost:
    """Parameters and MACs of one forward pass of one image at `img_size` (default: the model's)."""
    info = vit_info(model)
    height, width = img_size or info.img_size
    info.grid_for(height, width)
    totals = {"macs": 0, "attention": 0}

    def count(module, inputs, output):
        if isinstance(module, nn.Linear):
            totals["macs"] += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            totals["macs"] += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:  # attention: Q K^T and A V for every attending head
            B, N, C = inputs[0].shape
            heads = module.num_kept if isinstance(module, ReplacedAttention) else module.num_heads
            totals["attention"] += 2 * B * heads * N * N * module.head_dim
            mixer = getattr(module, "mixer", None)
            if isinstance(mixer, DepthwiseMixer):
                h, w = module.grid_size
                totals["macs"] += B * h * w * mixer.conv.weight[0].numel() * mixer.conv.out_channels
            if isinstance(mixer, SharedKernelMixer):  # one kernel, on every channel
                h, w = module.grid_size
                totals["macs"] += B * h * w * mixer.kernel.numel() * mixer.channels
            if isinstance(mixer, FixedMixer):
                totals["attention"] += B * len(module.conv_heads) * N * N * module.head_dim
            if isinstance(module, EnsembleHeadAttention) and not module.folded:
                # its training form calls F.linear with merged weights, which the Linear hooks miss;
                # merging the weights is per forward, not per image, so it is not counted
                totals["macs"] += 2 * B * N * C * module.head_dim

    mixing = {id(m.conv) for m in model.modules() if isinstance(m, DepthwiseMixer)}
    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d, Attention, ReplacedAttention)) and id(m) not in mixing]
    try:
        with eval_mode(model):
            p = next(model.parameters())
            model(torch.zeros(1, as_vit(model).patch_embed.proj.in_channels, height, width, device=p.device,
                              dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return ModelCost(params=count_params(model), macs=totals["macs"] + totals["attention"],
                     attention_macs=totals["attention"])
