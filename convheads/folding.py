"""The folded variant: one k x k kernel per block, scaled per channel, so that W_V and W_O fold.

A depthwise block keeps W_V and W_O as two C x C matmuls: a kernel per channel between them does
not let them fold. With one kernel K for the whole block, T_K (SharedKernelMixer: prefix scalars
alpha, beta [P], then the k x k convolution of the patch grid; the same map of the tokens on every
channel) commutes with any matrix on the channels, and a per-channel scale a [C] after it is a
diagonal matrix. Training form, on tokens x [B, N, C]:

    y = (a * T_K(x W_V^T + b_V)) W_O^T + b_O
      = T_K(x) (W_O diag(a) W_V)^T + T_K(1) (W_O diag(a) b_V)^T + b_O

T_K(1) [N] is T_K of a constant 1: S(p) (1 + sum_j beta_j) on patch p, where S(p) is the sum of
K's taps that fall on the grid there (smaller at the borders), and 1 + alpha_j on prefix token j.
`fold()` bakes the second line in for deployment: T_K on x (C channels, k^2 MACs each per patch),
one Linear(C -> C) and the rank-1 bias T_K(1) x value_bias. Its cost is the identity variant's
plus the convolution. A folded layer cannot be unfolded.

The rank-1 bias map is a pass over the [N, C] tokens of its own, which costs more time than its
arithmetic says (in onnxruntime a fifth of what the mixing adds to identity). Where W_V z = b_V has a
solution z (W_V invertible), the bias goes in front of the mixing instead, as a value shift:

    T_K(x) M^T + T_K(1) (M z)^T = T_K(x + z) M^T        (M = W_O diag(a) W_V)

and T_K adds z to the small prefix tensors and to the row the patches get from them anyway: no
pass of its own. `bias_at` says which form a folded layer uses ("input": the shift, "output": the
bias map); fold() picks "input" unless z would cost float32 precision (MAX_SHIFT_GAIN). The shift
runs in float32 only: in half precision (or under autocast) x + z rounds x to z's scale, so there the
bias map is used.

Init from the attention fit: the rank-1 projection of the block's fitted kernels (kernel_h ~ s_h K,
the leading singular pair, scaled so that a has mean 1), and the prefix scalars as the least-squares
single pair for the heads' fitted ones (`init_from_fit`).
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from .errors import ConvHeadsError
from .layers import ReplacedAttention
from .mixers import SharedKernelMixer
from .mixing import addcmul

EPS = 1e-6  # below this a least-squares denominator is treated as zero (that scalar starts at 0)
# The value shift z carries the bias when the rounding it adds, about float32's epsilon x
# ||M|| ||z|| / ||M z|| of the bias, stays below ~1e-3 of it; trained ViTs measure 30-300.
MAX_SHIFT_GAIN = 1e4
BIAS_FORMS = ("input", "output")


def rank_one(kernels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """kernels [H, k, k] -> (K [k, k], s [H]) with s_h K the best rank-1 fit of kernel_h (least
    squares over all taps), s of mean 1 and K's taps summing positive. Kernels that are all zero
    give K = 0 and s = 1."""
    H, k, _ = kernels.shape
    u, sv, vh = torch.linalg.svd(kernels.reshape(H, k * k).double(), full_matrices=False)
    s, K = u[:, 0] * sv[0], vh[0]
    if K.sum() < 0:
        s, K = -s, -K
    mean = s.mean()
    if mean.abs() <= EPS:
        return (K * mean).view(k, k).to(kernels.dtype), torch.ones_like(s, dtype=kernels.dtype)
    return (K * mean).view(k, k).to(kernels.dtype), (s / mean).to(kernels.dtype)


def _least_squares(scale: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[P, H] targets -> [P, 1]: the x_j minimising sum_h (scale_h x_j - targets[j, h])^2."""
    denom = (scale * scale).sum()
    if denom <= EPS:
        return targets.new_zeros(targets.shape[0], 1)
    return (targets @ scale / denom)[:, None]


def value_shift(w_v: torch.Tensor, b_v: torch.Tensor, m: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """z with W_V z = b_V, and its gain ||M|| ||z|| / ||M z|| (inf where W_V is singular)."""
    try:
        z = torch.linalg.solve(w_v.double(), b_v.double())
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        return torch.zeros_like(b_v), float("inf")
    if not torch.isfinite(z).all():
        return torch.zeros_like(b_v), float("inf")
    if z.norm() == 0:  # b_V = 0: nothing to carry
        return z.to(b_v.dtype), 0.0
    u = m.double() @ z
    if u.norm() == 0:
        return z.to(b_v.dtype), float("inf")
    return z.to(b_v.dtype), (torch.linalg.matrix_norm(m.double(), 2) * z.norm() / u.norm()).item()


class FoldedHeadAttention(ReplacedAttention):
    """Drop-in for timm's `Attention`: the whole block one shared-kernel mixing between W_V and W_O
    (see the module docstring). Training form: in_proj (W_V, b_V), scale (a), proj (W_O, b_O);
    folded: proj (W_O diag(a) W_V, b_O) and value_bias (W_O diag(a) b_V, or None), with the buffer
    value_shift (z) where bias_at is "input"."""

    def __init__(self, attn: Attention, grid_size: Tuple[int, int], num_prefix_tokens: int, kernel_size: int = 3):
        super().__init__(attn, range(attn.num_heads), grid_size, num_prefix_tokens, kernel_size, "folded")
        if not isinstance(attn.norm, nn.Identity):
            raise ConvHeadsError("variant='folded' cannot fold W_V and W_O through the attention output norm "
                                 "(timm scale_norm=True); use variant='depthwise' for this model")
        C = attn.qkv.in_features
        w, b = attn.qkv.weight.detach(), attn.qkv.bias
        dd = dict(device=w.device, dtype=w.dtype)
        self.folded = False
        self.in_proj = nn.Linear(C, C, bias=b is not None, **dd)                 # W_V
        self.in_proj.weight.data.copy_(w[2 * C:])
        if b is not None:
            self.in_proj.bias.data.copy_(b.detach()[2 * C:])
        self.proj = nn.Linear(C, attn.proj.out_features, bias=attn.proj.bias is not None, **dd)
        self.proj.load_state_dict(attn.proj.state_dict())                        # W_O
        self.scale = nn.Parameter(torch.ones(C, **dd))                           # a
        self.mixer = SharedKernelMixer(C, num_prefix_tokens, kernel_size, **dd)

    @property
    def bias_at(self) -> Optional[str]:
        """How the folded layer adds its value bias: "input" (the value shift z), "output" (the bias
        map); None unfolded or without a value bias."""
        if "value_shift" in self._buffers:
            return "input"
        return "output" if getattr(self, "value_bias", None) is not None else None

    @property
    def needs_folding(self) -> bool:
        return not self.folded

    def mixing_parameters(self):
        """The kernel and prefix scalars, and the per-channel scale while unfolded."""
        return list(self.mixer.parameters()) + ([] if self.folded else [self.scale])

    @torch.no_grad()
    def init_from_fit(self, fit: Dict[str, torch.Tensor]) -> None:
        """Per-head fits (fitting.for_heads of the "depthwise" fit: kernel [H, k, k]; alpha, beta [P, H])
        -> K and a from their rank-1 projection; alpha, beta the least-squares single pair: a_h alpha ~
        alpha_h, and a_h beta S_K ~ beta_h S_h, where S is a kernel's mean in-grid tap sum (what a
        prefix token's value reaches a patch with)."""
        if self.folded:
            raise ConvHeadsError("this folded layer is in its deployment form; initialise it before fold()")
        kernels = fit["kernel"].to(self.scale)
        K, s = rank_one(kernels)
        self.mixer.kernel.copy_(K)
        self.scale.copy_(s.repeat_interleave(self.head_dim))
        if "alpha" in fit and self.num_prefix_tokens:
            self.mixer.alpha.copy_(_least_squares(s, fit["alpha"].to(s)))
            sums = self._mean_tap_sums(torch.cat([kernels, K[None]]))
            reach = fit["beta"].to(s) * sums[:-1]                               # [P, H]: beta_h S_h
            self.mixer.beta.copy_(_least_squares(s * sums[-1], reach))

    def _mean_tap_sums(self, kernels: torch.Tensor) -> torch.Tensor:
        """[n] for kernels [n, k, k]: each kernel's in-grid tap sum averaged over the patches."""
        h, w = self.grid_size
        ones = kernels.new_ones(1, 1, h, w)
        k = kernels.shape[-1]
        return F.conv2d(ones, kernels[:, None], padding=k // 2).mean(dim=(0, 2, 3))

    @torch.no_grad()
    def fold(self, bias_at: Optional[str] = None) -> "FoldedHeadAttention":
        """Bake W_V, a and W_O into one Linear(C -> C) and the value bias, in place. bias_at: "input"
        (the value shift), "output" (the bias map), or None: "input" where it keeps float32 precision
        (a model rebuilt from a file passes the form it was saved in)."""
        if self.folded:
            return self
        if bias_at is not None and bias_at not in BIAS_FORMS:
            raise ConvHeadsError(f"bias_at must be one of {BIAS_FORMS} or None; got {bias_at!r}")
        w_o = self.proj.weight * self.scale                                      # W_O diag(a)
        proj = nn.Linear(w_o.shape[1], w_o.shape[0], bias=self.proj.bias is not None,
                         device=w_o.device, dtype=w_o.dtype)
        proj.weight.copy_(w_o @ self.in_proj.weight)
        if self.proj.bias is not None:
            proj.bias.copy_(self.proj.bias)
        self.value_bias = None
        if self.in_proj.bias is not None:
            self.value_bias = nn.Parameter(w_o @ self.in_proj.bias)
            if self.in_proj.bias.is_meta:  # rebuilt on the meta device: the saved state holds z
                z, gain = torch.empty_like(self.in_proj.bias), 0.0
            else:
                z, gain = value_shift(self.in_proj.weight, self.in_proj.bias, proj.weight)
            if bias_at is None:
                bias_at = "input" if gain <= MAX_SHIFT_GAIN else "output"
            elif bias_at == "input" and gain == float("inf"):
                raise ConvHeadsError("bias_at='input' needs W_V z = b_V to have a solution, and this block's W_V "
                                     "is singular; fold with bias_at='output' (or None to choose)")
            if bias_at == "input":
                self.register_buffer("value_shift", z)
        self.proj = proj
        del self.in_proj, self.scale
        self.folded = True
        return self

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:  # through the modules, so hooks (model_cost) see them
            full = x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
            shift = self.value_shift if self.bias_at == "input" and full else None
            y = self.proj(self.mixer(x, self.grid_size, shift))
            if self.value_bias is None or shift is not None:
                return y
            return addcmul(y, self.mixer.of_ones(self.grid_size), self.value_bias)
        return self.proj(self.scale * self.mixer(self.in_proj(x), self.grid_size))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", folded={self.folded}" + (f", bias_at={self.bias_at}" if self.bias_at else "")
