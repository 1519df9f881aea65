"""The replacement layers: attention where some heads are a fixed mixing of their values.

For a head whose attention matrix A is a fixed band around each query patch, A @ V is exactly a
depthwise convolution of V laid out on the patch grid. `ConvHeadAttention` keeps the pretrained
value rows of W_V and the columns of W_O for the replaced heads, drops their W_Q / W_K rows, and
mixes their values with its variant's mixer (mixers.py: depthwise, depthwise_global, fixed,
identity, drop). `EnsembleHeadAttention` (ensemble.py) merges all heads of a block into one and
mixes it like "depthwise"; `FoldedHeadAttention` (folding.py) mixes a whole block with one kernel
so that W_V and W_O fold; `ReplacedAttention` holds what the layers share.
"""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from .errors import ConvHeadsError
from .mixers import Mixer, make_mixer

# Variants whose mixing is the depthwise convolution (mixing.depthwise_mix), with or without the global term.
CONV_VARIANTS = ("depthwise", "depthwise_global")


def _permute_norm(norm: nn.Module, perm: torch.Tensor) -> nn.Module:
    """timm's optional scale_norm normalises the concatenated head outputs; reorder its affine
    parameters like the channels (mean and variance do not depend on channel order)."""
    if isinstance(norm, nn.Identity):
        return norm
    if not isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
        raise ConvHeadsError(f"unsupported attention output norm {type(norm).__name__}")
    norm = copy.deepcopy(norm)
    with torch.no_grad():
        for p in (norm.weight, getattr(norm, "bias", None)):
            if p is not None:
                p.copy_(p[perm])
    return norm


class ReplacedAttention(nn.Module):
    """Base of the replacement layers: their bookkeeping, and the mixer of their mixed heads
    (`self.mixer`, set by each layer; see mixers.py). Prefix tokens: CLS, distillation and register
    tokens, P of them, before the h x w patch grid."""

    mixer: Mixer

    def __init__(self, attn: Attention, conv_heads: Sequence[int], grid_size: Tuple[int, int],
                 num_prefix_tokens: int, kernel_size: int, variant: str):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ConvHeadsError("gated attention (timm Attention(gated=True)) is not supported")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.conv_heads = tuple(sorted(conv_heads))
        self.kept_heads = tuple(h for h in range(self.num_heads) if h not in self.conv_heads)
        self.num_kept = len(self.kept_heads)
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.kernel_size = kernel_size
        self.variant = variant
        self.proj_drop = attn.proj_drop

    @property
    def mixing(self) -> str:
        """How a depthwise mixer computes: "auto" (per call the fastest, see mixing.choose) or one of
        mixing.IMPLEMENTATIONS. Every choice computes the same function; save_model keeps it."""
        return self.mixer.implementation

    @mixing.setter
    def mixing(self, name: str) -> None:
        self.mixer.implementation = name

    def mixing_parameters(self) -> List[nn.Parameter]:
        """The parameters of the mixing (kernels, then the prefix scalars and global terms; or the
        fixed matrices); none for identity and drop."""
        return list(self.mixer.parameters())

    def init_from_fit(self, fit) -> None:
        """Start the mixing from parameters fitted to the mixed heads' mean attention (fitting.for_heads)."""
        self.mixer.init_from_fit(fit)

    @property
    def needs_folding(self) -> bool:
        """Whether the layer is in a training form that `fold()` turns into a cheaper deployment form."""
        return False

    def fold(self) -> "ReplacedAttention":
        """The deployment form, in place (the variants trained unfolded override this)."""
        return self

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ConvHeadsError("convolution heads mix the full patch grid: attention masks and "
                                 "causal attention are not supported")
        x = self._attend(x)  # [B, N, C] -> [B, N, C], defined by each layer
        return self.proj_drop(x) if self.training else x  # (eval: skip a no-op module call)

    def extra_repr(self) -> str:
        return (f"conv_heads={list(self.conv_heads)}, num_heads={self.num_heads}, variant={self.variant!r}, "
                f"kernel_size={self.kernel_size}, grid_size={self.grid_size}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, mixing={self.mixing!r}")


class ConvHeadAttention(ReplacedAttention):
    """Drop-in for timm's `Attention` in which the heads `conv_heads` are a depthwise convolution.

    Kept heads run fused scaled-dot-product attention with their original Q/K/V weights. Inside
    the layer the kept heads' channels come first, then the replaced heads'; W_O's columns are
    permuted to match, so the function is the original one for the kept heads. Replaced heads mix
    prefix tokens as ReplacedAttention says. The "identity" variant passes values through
    unchanged (prefix tokens included); a block whose heads are all identity heads folds W_V and
    W_O into one Linear(C -> C). The "fixed" variant holds `attention` [heads, N, N] (rows: the
    query token, columns: the key token; built for one token count N) and computes attention @ V.
    """

    def __init__(
            self,
            attn: Attention,
            conv_heads: Sequence[int],
            grid_size: Tuple[int, int],
            num_prefix_tokens: int,
            kernel_size: int = 3,
            variant: str = "depthwise",
    ):
        super().__init__(attn, conv_heads, grid_size, num_prefix_tokens, kernel_size, variant)
        H, d = self.num_heads, self.head_dim
        C = attn.qkv.in_features
        self.attn_drop = attn.attn_drop.p
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm

        def head_rows(part: int, heads: Sequence[int]) -> list:  # part: 0 = q, 1 = k, 2 = v
            return [part * H * d + h * d + j for h in heads for j in range(d)]

        # "drop" keeps nothing of its heads: neither their W_V rows nor their W_O columns.
        mixed = () if variant == "drop" else self.conv_heads
        rows = head_rows(0, self.kept_heads) + head_rows(1, self.kept_heads) + head_rows(2, self.kept_heads)
        rows += head_rows(2, mixed)
        perm = torch.tensor([h * d + j for h in self.kept_heads + mixed for j in range(d)], dtype=torch.long)
        if variant == "drop" and not isinstance(attn.norm, nn.Identity):
            raise ConvHeadsError("variant='drop' removes channels that the attention's output norm normalises over; "
                                 "not supported for models with an attention output norm (scale_norm)")
        w_in = attn.qkv.weight.detach()[rows]
        b_in = attn.qkv.bias.detach()[rows] if attn.qkv.bias is not None else None
        w_out = attn.proj.weight.detach()[:, perm]
        b_out = attn.proj.bias.detach() if attn.proj.bias is not None else None
        norm = _permute_norm(attn.norm, perm)
        dd = dict(device=w_in.device, dtype=w_in.dtype)

        if variant == "drop" and self.num_kept == 0:
            # Nothing attends: the block's attention adds W_O's bias alone (a learnable constant).
            self.in_proj, self.norm, self.proj = None, nn.Identity(), None
            self.bias = nn.Parameter(b_out.clone()) if b_out is not None else None
        elif variant == "identity" and self.num_kept == 0 and isinstance(norm, nn.Identity):
            # y = (x W_V^T + b_V) W_O^T + b_O = x (W_O W_V)^T + (W_O b_V + b_O): one matmul.
            b = torch.zeros(w_out.shape[0], **dd) if b_out is None else b_out.clone()
            if b_in is not None:
                b += w_out @ b_in
            self.in_proj = nn.Linear(C, w_out.shape[0], **dd)
            self.in_proj.weight.data.copy_(w_out @ w_in)
            self.in_proj.bias.data.copy_(b)
            self.norm, self.proj = nn.Identity(), nn.Identity()
        else:
            self.in_proj = nn.Linear(C, len(rows), bias=b_in is not None, **dd)
            self.in_proj.weight.data.copy_(w_in)
            if b_in is not None:
                self.in_proj.bias.data.copy_(b_in)
            self.norm = norm
            self.proj = nn.Linear(w_out.shape[1], w_out.shape[0], bias=b_out is not None, **dd)
            self.proj.weight.data.copy_(w_out)
            if b_out is not None:
                self.proj.bias.data.copy_(b_out)

        mixed_heads = len(self.conv_heads) if variant != "drop" else 0
        self.mixer = make_mixer(variant, mixed_heads, d, num_prefix_tokens, kernel_size, self.grid_size, **dd)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if self.in_proj is None:  # every head dropped
            return x.new_zeros(B, N, C) if self.bias is None else self.bias.expand(B, N, C)
        x = self.in_proj(x)
        kept_dim = 3 * self.num_kept * self.head_dim
        out = self.mixer(x[..., kept_dim:] if kept_dim else x, self.grid_size)
        if self.num_kept:
            qkv = x[..., :kept_dim].reshape(B, N, 3, self.num_kept, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            kept = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
            out = torch.cat([kept.transpose(1, 2).reshape(B, N, -1), out], dim=-1)
        return self.proj(out if isinstance(self.norm, nn.Identity) else self.norm(out))


def fold_layers(model: nn.Module) -> nn.Module:
    """Fold every replaced layer trained unfolded (ensemble, folded) into its deployment form, in
    place; return the model."""
    for m in model.modules():
        if isinstance(m, ReplacedAttention) and m.needs_folding:
            m.fold()
    return model
