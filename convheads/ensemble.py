"""Head ensembling (SPViT-like): the H heads of a block merge into one head.

    p   = softmax(logits / T)                          # [H]; T = 0.01, logits start at 0 (equal weights)
    V'  = sum_i p_i V_i = x (sum_i p_i W_V[i])^T + sum_i p_i b_V[i]      # one head of width d
    y   = mix(V') (sum_i p_i W_O[i])^T + b_O           # mix: prefix scalars + depthwise conv on d channels

Training keeps every head's W_V rows and W_O columns and the logits, so fine-tuning can move all of
them; it merges the weights before the matmuls (cheaper than merging the per-head values, same
result). `fold()` bakes p in for inference: Linear(C -> d), the depthwise conv on d channels and
Linear(d -> C), cheaper than the identity variant's C x C map. A folded layer cannot be unfolded.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from .errors import ConvHeadsError
from .layers import ReplacedAttention
from .mixers import DepthwiseMixer

TEMPERATURE = 0.01


class EnsembleHeadAttention(ReplacedAttention):
    """Drop-in for timm's `Attention`: all heads merged into one depthwise-convolution head."""

    def __init__(self, attn: Attention, grid_size: Tuple[int, int], num_prefix_tokens: int,
                 kernel_size: int = 3, temperature: float = TEMPERATURE):
        super().__init__(attn, range(attn.num_heads), grid_size, num_prefix_tokens, kernel_size, "ensemble")
        if not isinstance(attn.norm, nn.Identity):
            raise ConvHeadsError("variant='ensemble' cannot merge heads through the attention output norm "
                                 "(timm scale_norm=True); use variant='depthwise' for this model")
        H, d, C = self.num_heads, self.head_dim, attn.qkv.in_features
        w, b = attn.qkv.weight.detach(), attn.qkv.bias
        dd = dict(device=w.device, dtype=w.dtype)
        self.temperature = temperature
        self.folded = False
        self.in_proj = nn.Linear(C, H * d, bias=b is not None, **dd)       # every head's W_V rows
        self.in_proj.weight.data.copy_(w[2 * H * d:])
        if b is not None:
            self.in_proj.bias.data.copy_(b.detach()[2 * H * d:])
        self.proj = nn.Linear(H * d, attn.proj.out_features, bias=attn.proj.bias is not None, **dd)
        self.proj.load_state_dict(attn.proj.state_dict())                  # every head's W_O columns
        self.logits = nn.Parameter(torch.zeros(H, **dd))
        self.mixer = DepthwiseMixer(1, d, num_prefix_tokens, kernel_size, **dd)

    @property
    def needs_folding(self) -> bool:
        return not self.folded

    def head_weights(self) -> torch.Tensor:
        """p [H]: how much each original head contributes to the merged one."""
        if self.folded:
            raise ConvHeadsError("this ensemble layer is folded: its head weights are baked into in_proj and proj")
        return (self.logits / self.temperature).softmax(dim=0)

    def merged_weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """The merged head's W_V' [d, C], b_V' [d] (or None) and W_O' [C, d]."""
        if self.folded:
            return self.in_proj.weight, self.in_proj.bias, self.proj.weight
        H, d = self.num_heads, self.head_dim
        p = self.head_weights()
        w_in = torch.einsum("h,hdc->dc", p, self.in_proj.weight.view(H, d, -1))
        b_in = p @ self.in_proj.bias.view(H, d) if self.in_proj.bias is not None else None
        w_out = torch.einsum("h,chd->cd", p, self.proj.weight.view(-1, H, d))
        return w_in, b_in, w_out

    @torch.no_grad()
    def init_from_fit(self, fit: Dict[str, torch.Tensor]) -> None:
        """Per-head fits (kernel [H, k, k]; alpha, beta [P, H]): the merged head starts from their means,
        as the heads start equally weighted."""
        self.mixer.init_from_fit({n: fit[n].mean(dim=1 if n in ("alpha", "beta") else 0, keepdim=True)
                                  for n in ("kernel", "alpha", "beta") if n in fit})

    @torch.no_grad()
    def fold(self) -> "EnsembleHeadAttention":
        """Bake the head weights in, in place: Linear(C -> d), depthwise conv, Linear(d -> C)."""
        if self.folded:
            return self
        w_in, b_in, w_out = self.merged_weights()
        C, d = w_in.shape[1], self.head_dim
        dd = dict(device=w_in.device, dtype=w_in.dtype)
        in_proj = nn.Linear(C, d, bias=b_in is not None, **dd)
        proj = nn.Linear(d, C, bias=self.proj.bias is not None, **dd)
        in_proj.weight.copy_(w_in)
        proj.weight.copy_(w_out)
        if b_in is not None:
            in_proj.bias.copy_(b_in)
        if self.proj.bias is not None:
            proj.bias.copy_(self.proj.bias)
        self.in_proj, self.proj = in_proj, proj
        del self.logits
        self.folded = True
        return self

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:  # through the modules, so hooks (model_cost) see them
            return self.proj(self.mixer(self.in_proj(x), self.grid_size))
        w_in, b_in, w_out = self.merged_weights()
        v = self.mixer(F.linear(x, w_in, b_in), self.grid_size)                            # [B, N, d]
        return F.linear(v, w_out, self.proj.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}, folded={self.folded}"


def fold_ensembles(model: nn.Module) -> nn.Module:
    """Fold every EnsembleHeadAttention of `model` into its inference form, in place; return the model."""
    for m in model.modules():
        if isinstance(m, EnsembleHeadAttention):
            m.fold()
    return model
