"""The replacement layers: attention where some heads are a fixed mixing of their values.

For a head whose attention matrix A is a fixed band around each query patch, A @ V is exactly a
depthwise convolution of V laid out on the patch grid (METHOD.md section 1). `ConvHeadAttention`
keeps the pretrained value rows of W_V and the columns of W_O for the replaced heads, drops their
W_Q / W_K rows, and mixes their values by its variant:
  "depthwise"         a depthwise k x k convolution (plus the prefix-token scalars);
  "depthwise_global"  the same plus a global term per head: a learnable weight times the mean of
                      the head's values over all tokens, added to every patch, and a P x P mixing
                      of the prefix tokens. Band + uniform level: what many input-independent
                      heads actually do (they attend broadly, not only locally), at linear cost;
  "identity"          no mixing at all (the speed limit of removing attention);
  "fixed"             each head's own stored [N, N] mean attention matrix (learnable), applied to
                      its values: quadratic like attention, only Q and K are gone. A reference for
                      what "input-independent" can keep at best (the frontier), not for deployment.
`EnsembleHeadAttention` (ensemble.py) merges all heads of a block into one and mixes it like
"depthwise"; `ReplacedAttention` holds what the layers share.
"""
import copy
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention

from .errors import ConvHeadsError
from .mixing import AUTO, ParameterCache, apply_banded, banded_matrix, check_implementation, choose, depthwise_mix

# Variants whose mixing is the depthwise convolution (mixing.depthwise_mix), with or without the global term.
CONV_VARIANTS = ("depthwise", "depthwise_global")
# The mixing's scalars besides the kernels, where a layer has them (prefix tokens, global term).
SCALARS = ("alpha", "beta", "gamma", "phi")


def gaussian_kernel(kernel_size: int, sigma: float = 1.0) -> torch.Tensor:
    """A normalised 2-D Gaussian [k, k] (the reference implementation's kernel init)."""
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).float()


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
    """Base of the replacement layers: their bookkeeping and the spatial mixing of mixed heads.

    Prefix tokens (CLS, distillation, register tokens; P of them) are handled per mixed head i and
    prefix token j with two learnable scalars, generalising the reference's CLS handling:
        prefix_out[j] = v_prefix[j] + alpha[j, i] * mean(V_i over patches)
        V_i(patches) += sum_j beta[j, i] * v_prefix[j]      (before the convolution)
    With P = 1 this is exactly the reference. Patch values are then convolved depthwise (k x k,
    stride 1, zero "same" padding) on the h x w patch grid. mixing.py computes this, by one of three
    implementations that `mixing` names ("auto": the fastest for each call).
    """

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
        self.mixing = AUTO

    def _init_mixing(self, heads: int, global_term: bool = False, **dd) -> None:
        """The depthwise conv on `heads` x head_dim channels (Gaussian init) and alpha, beta [P, heads];
        with the global term also gamma [heads] (init 0) and phi [P, P, heads] (init identity): the
        Gaussian start of "depthwise_global" computes what "depthwise" does."""
        channels, k, P = heads * self.head_dim, self.kernel_size, self.num_prefix_tokens
        self.conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False, **dd)
        self.init_kernels(gaussian_kernel(k).expand(heads, -1, -1))
        if P:
            # Reference init: uniform in [0, 1).
            self.alpha = nn.Parameter(torch.rand(P, heads, **dd))
            self.beta = nn.Parameter(torch.rand(P, heads, **dd))
        if global_term:
            self.gamma = nn.Parameter(torch.zeros(heads, **dd))
            if P:
                self.phi = nn.Parameter(torch.eye(P, **dd)[..., None].repeat(1, 1, heads))

    @torch.no_grad()
    def init_kernels(self, kernels: torch.Tensor) -> None:
        """Set each mixed head's k x k kernel (kernels: [heads, k, k]) on all its channels."""
        w = kernels.to(self.conv.weight).repeat_interleave(self.head_dim, dim=0)
        self.conv.weight.copy_(w[:, None])

    @torch.no_grad()
    def init_from_fit(self, fit: Dict[str, torch.Tensor]) -> None:
        """Start from parameters fitted to the mixed heads' mean attention (fitting.fit_mixing, for
        these heads: "kernel" [heads, k, k]; "alpha", "beta" [P, heads]; "gamma" [heads] and "phi"
        [P, P, heads] where the layer has them)."""
        self.init_kernels(fit["kernel"])
        for name, p in self._scalars().items():
            p.copy_(fit[name])

    @property
    def mixing(self) -> str:
        """How the mixed heads are mixed: "auto" (per call the fastest, see mixing.choose) or one of
        mixing.IMPLEMENTATIONS. Every choice computes the same function; save_model keeps it."""
        return self._mixing

    @mixing.setter
    def mixing(self, name: str) -> None:
        self._mixing = check_implementation(name)
        self._banded = ParameterCache()

    def _scalars(self) -> Dict[str, nn.Parameter]:
        # from the parameter dict: getattr on a missing name raises inside nn.Module (microseconds a call)
        return {n: self._parameters[n] for n in SCALARS if n in self._parameters}

    def mixing_parameters(self) -> List[nn.Parameter]:
        """The parameters of the spatial mixing: kernels, then alpha and beta when there are prefix
        tokens, then gamma and phi with the global term."""
        return [self.conv.weight] + list(self._scalars().values())

    def _mix(self, v: torch.Tensor) -> torch.Tensor:
        """Spatially mix the mixed heads' values v [B, N, Cr] -> [B, N, Cr] (Cr = heads x head_dim)."""
        B, N, Cr = v.shape
        P, (h, w) = self.num_prefix_tokens, self.grid_size
        if N != P + h * w:
            raise ConvHeadsError(
                f"got {N} tokens but the convolution heads expect {P} prefix tokens + a {h} x {w} "
                f"patch grid; run the model at the resolution it was built for (or build it with "
                f"dynamic_img_size=True)")
        how = self._mixing if self._mixing != AUTO else choose(B, N, Cr, P, v.device)
        alpha, beta, gamma, phi = (self._parameters.get(n) for n in SCALARS)
        mix = functools.partial(depthwise_mix, weight=self.conv.weight, alpha=alpha, beta=beta,
                                grid_size=self.grid_size, head_dim=self.head_dim, gamma=gamma, phi=phi)
        if how == "banded":
            params = self.mixing_parameters()
            matrix = self._banded.get(self.grid_size, params, lambda: banded_matrix(mix, N, Cr, params[0]))
            return apply_banded(v, matrix)
        return mix(v, how=how)

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

        if variant in CONV_VARIANTS:
            self._init_mixing(len(self.conv_heads), global_term=variant == "depthwise_global", **dd)
        elif variant == "fixed":
            self.attention = nn.Parameter(self._gaussian_matrix(len(self.conv_heads), **dd))

    def _gaussian_matrix(self, heads: int, **dd) -> torch.Tensor:
        """[heads, N, N]: the Gaussian k x k convolution's banded matrix on the patches, the identity on
        the prefix tokens (the start of "fixed" without scores; the scores' mean attention replaces it)."""
        (h, w), P, k = self.grid_size, self.num_prefix_tokens, self.kernel_size
        weight = gaussian_kernel(k).to(**dd).expand(heads, 1, k, k)
        zeros = torch.zeros(P, heads, **dd) if P else None
        mix = functools.partial(depthwise_mix, weight=weight, alpha=zeros, beta=zeros, grid_size=(h, w), head_dim=1)
        return banded_matrix(mix, P + h * w, heads, weight).permute(2, 1, 0).contiguous()  # [from, to, h] -> [h, to, from]

    def mixing_parameters(self) -> List[nn.Parameter]:
        if self.variant in ("identity", "drop"):  # nothing mixes
            return []
        return [self.attention] if self.variant == "fixed" else super().mixing_parameters()

    @torch.no_grad()
    def init_from_fit(self, fit: Dict[str, torch.Tensor]) -> None:
        if self.variant == "fixed":  # fit["attention"]: the heads' mean attention [heads, N, N]
            self.attention.copy_(fit["attention"])
        else:
            super().init_from_fit(fit)

    def _fixed_mix(self, v: torch.Tensor) -> torch.Tensor:
        """attention [heads, N, N] @ the heads' values v [B, N, heads x d]."""
        B, N, Cr = v.shape
        if N != self.attention.shape[-1]:
            raise ConvHeadsError(f"got {N} tokens but the fixed-attention heads hold [{self.attention.shape[-1]} x "
                                 f"{self.attention.shape[-1]}] matrices; run the model at the resolution it was "
                                 f"built for")
        heads = v.view(B, N, -1, self.head_dim).transpose(1, 2)              # [B, heads, N, d]
        return (self.attention @ heads).transpose(1, 2).reshape(B, N, Cr)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if self.in_proj is None:  # every head dropped
            return x.new_zeros(B, N, C) if self.bias is None else self.bias.expand(B, N, C)
        x = self.in_proj(x)
        kept_dim = 3 * self.num_kept * self.head_dim
        out = x[..., kept_dim:] if kept_dim else x
        if self.variant == "drop":
            out = out[..., :0]
        elif self.variant in CONV_VARIANTS:
            out = self._mix(out)
        elif self.variant == "fixed":
            out = self._fixed_mix(out)
        if self.num_kept:
            qkv = x[..., :kept_dim].reshape(B, N, 3, self.num_kept, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            kept = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
            out = torch.cat([kept.transpose(1, 2).reshape(B, N, -1), out], dim=-1)
        return self.proj(out if isinstance(self.norm, nn.Identity) else self.norm(out))
