"""Token mixers: what a replaced head does with its values instead of attending, one module per variant.

Every mixer maps the mixed heads' values v [B, N, Cr] (N = P prefix tokens + an h x w patch grid,
Cr = heads x head_dim) to their mixed form; a replacement layer (layers.py) calls it between its
W_V and W_O. `MIXERS` names the mixer of each variant:

  depthwise         DepthwiseMixer: prefix-token scalars, then a depthwise k x k convolution of
                    the patch grid (mixing.depthwise_mix)
  depthwise_global  DepthwiseMixer with the global term: plus a learnable weight times the mean of
                    the head's values over all tokens on every patch, and a P x P prefix mixing
  fixed             FixedMixer: each head's stored [N, N] mean attention matrix (learnable), applied
                    to its values; quadratic like attention (a reference, not for deployment)
  identity          IdentityMixer: values pass through unchanged (the speed limit of removing attention)
  folded            SharedKernelMixer: one k x k kernel and one pair of prefix scalars for every
                    channel, so the map of the tokens is the same on all of them (folding.py)
  drop              DropMixer: nothing; the heads are gone, their W_V rows and W_O columns too
"""
import functools
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .errors import ConvHeadsError
from .mixing import (
    AUTO,
    ParameterCache,
    apply_banded,
    banded_matrix,
    check_implementation,
    choose,
    depthwise_mix,
)

# The mixing's scalars besides the kernels, where a mixer has them (prefix tokens, global term).
SCALARS = ("alpha", "beta", "gamma", "phi")


def gaussian_kernel(kernel_size: int, sigma: float = 1.0) -> torch.Tensor:
    """A normalised 2-D Gaussian [k, k] (the reference implementation's kernel init)."""
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).float()


def check_kernel_size(kernel_size) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConvHeadsError(f"kernel_size must be a positive odd integer ('same' padding); got {kernel_size!r}")


def check_tokens(tokens: int, num_prefix_tokens: int, grid_size: Tuple[int, int]) -> None:
    h, w = grid_size
    if tokens != num_prefix_tokens + h * w:
        raise ConvHeadsError(
            f"got {tokens} tokens but the convolution heads expect {num_prefix_tokens} prefix tokens + a {h} x {w} "
            f"patch grid; run the model at the resolution it was built for (or build it with dynamic_img_size=True)")


class Mixer(nn.Module):
    """Base of the mixers: `forward(v, grid_size)`; `implementation` matters to DepthwiseMixer alone."""

    implementation = AUTO

    def init_from_fit(self, fit: Dict[str, torch.Tensor]) -> None:
        """Start from parameters fitted to the heads' mean attention (fitting.for_heads)."""

    def _how(self, v: torch.Tensor, grid_size: Tuple[int, int]) -> str:
        """The mixing implementation for values v [B, N, C] on `grid_size` (checked): the set one, or
        AUTO's choice for this shape and device."""
        B, N, C = v.shape
        check_tokens(N, self.num_prefix_tokens, grid_size)
        how = self._implementation
        return choose(B, N, C, self.num_prefix_tokens, v.device) if how == AUTO else how


class IdentityMixer(Mixer):
    def forward(self, v: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        return v


class DropMixer(Mixer):
    def forward(self, v: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        return v[..., :0]


class DepthwiseMixer(Mixer):
    """Prefix tokens (P of them) are handled per mixed head i and prefix token j with two learnable
    scalars, generalising the reference's CLS handling:
        prefix_out[j] = v_prefix[j] + alpha[j, i] * mean(V_i over patches)
        V_i(patches) += sum_j beta[j, i] * v_prefix[j]      (before the convolution)
    With P = 1 this is exactly the reference. Patch values are then convolved depthwise (k x k,
    stride 1, zero "same" padding) on the h x w patch grid. With `global_term` a head also has
    gamma [heads] (init 0) and phi [P, P, heads] (init identity): the Gaussian start computes
    what the plain convolution does. mixing.py computes it by the implementation that
    `implementation` names ("auto": the fastest for each call)."""

    def __init__(self, heads: int, head_dim: int, num_prefix_tokens: int, kernel_size: int,
                 global_term: bool = False, **dd):
        super().__init__()
        channels, k, P = heads * head_dim, kernel_size, num_prefix_tokens
        self.head_dim, self.num_prefix_tokens = head_dim, num_prefix_tokens
        self.conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False, **dd)
        self.init_kernels(gaussian_kernel(k).expand(heads, -1, -1))
        if P:  # the reference's init: uniform in [0, 1)
            self.alpha = nn.Parameter(torch.rand(P, heads, **dd))
            self.beta = nn.Parameter(torch.rand(P, heads, **dd))
        if global_term:
            self.gamma = nn.Parameter(torch.zeros(heads, **dd))
            if P:
                self.phi = nn.Parameter(torch.eye(P, **dd)[..., None].repeat(1, 1, heads))
        self.implementation = AUTO

    @property
    def implementation(self) -> str:
        """"auto" (per call the fastest, see mixing.choose) or one of mixing.IMPLEMENTATIONS. Every
        choice computes the same function; save_model keeps it."""
        return self._implementation

    @implementation.setter
    def implementation(self, name: str) -> None:
        self._implementation = check_implementation(name)
        self._banded = ParameterCache()

    @torch.no_grad()
    def init_kernels(self, kernels: torch.Tensor) -> None:
        """Set each head's k x k kernel (kernels: [heads, k, k]) on all its channels."""
        w = kernels.to(self.conv.weight).repeat_interleave(self.head_dim, dim=0)
        self.conv.weight.copy_(w[:, None])

    @torch.no_grad()
    def init_from_fit(self, fit: Dict[str, torch.Tensor]) -> None:
        """fit: "kernel" [heads, k, k]; "alpha", "beta" [P, heads]; "gamma" [heads] and "phi" [P, P, heads]
        where the mixer has them."""
        self.init_kernels(fit["kernel"])
        for name, p in self.scalars().items():
            p.copy_(fit[name])

    def scalars(self) -> Dict[str, nn.Parameter]:
        # from the parameter dict: getattr on a missing name raises inside nn.Module (microseconds a call)
        return {n: self._parameters[n] for n in SCALARS if n in self._parameters}

    def forward(self, v: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        B, N, Cr = v.shape
        how = self._how(v, grid_size)
        alpha, beta, gamma, phi = (self._parameters.get(n) for n in SCALARS)
        mix = functools.partial(depthwise_mix, weight=self.conv.weight, alpha=alpha, beta=beta,
                                grid_size=grid_size, head_dim=self.head_dim, gamma=gamma, phi=phi)
        if how == "banded":
            params = list(self.parameters())
            matrix = self._banded.get(grid_size, params, lambda: banded_matrix(mix, N, Cr, params[0]))
            return apply_banded(v, matrix)
        return mix(v, how=how)


class FixedMixer(Mixer):
    """attention [heads, N, N] (rows: the query token, columns: the key token; built for one token
    count N) @ each head's values. It starts as the Gaussian k x k convolution's banded matrix on
    the patches and the identity on the prefix tokens; a fit puts the heads' mean attention there."""

    def __init__(self, heads: int, head_dim: int, num_prefix_tokens: int, kernel_size: int,
                 grid_size: Tuple[int, int], **dd):
        super().__init__()
        self.head_dim = head_dim
        (h, w), P, k = grid_size, num_prefix_tokens, kernel_size
        weight = gaussian_kernel(k).to(**dd).expand(heads, 1, k, k)
        zeros = torch.zeros(P, heads, **dd) if P else None
        mix = functools.partial(depthwise_mix, weight=weight, alpha=zeros, beta=zeros, grid_size=(h, w), head_dim=1)
        matrix = banded_matrix(mix, P + h * w, heads, weight)                      # [from, to, heads]
        self.attention = nn.Parameter(matrix.permute(2, 1, 0).contiguous())         # [heads, to, from]

    @torch.no_grad()
    def init_from_fit(self, fit: Dict[str, torch.Tensor]) -> None:
        self.attention.copy_(fit["attention"])   # the heads' mean attention [heads, N, N]

    def forward(self, v: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        B, N, Cr = v.shape
        if N != self.attention.shape[-1]:
            raise ConvHeadsError(f"got {N} tokens but the fixed-attention heads hold [{self.attention.shape[-1]} x "
                                 f"{self.attention.shape[-1]}] matrices; run the model at the resolution it was "
                                 f"built for")
        heads = v.view(B, N, -1, self.head_dim).transpose(1, 2)              # [B, heads, N, d]
        return (self.attention @ heads).transpose(1, 2).reshape(B, N, Cr)


class SharedKernelMixer(Mixer):
    """DepthwiseMixer's mixing with one kernel `kernel` [k, k] and one pair of prefix scalars
    (alpha, beta [P, 1]) for all channels: the same linear map T of the tokens on every channel.
    That map commutes with any matrix on the channels (T(x W^T) = T(x) W^T), which is what lets
    a block's W_V and W_O fold into one matrix (folding.py). "banded" computes T as one [N, N]
    matrix product."""

    def __init__(self, channels: int, num_prefix_tokens: int, kernel_size: int, **dd):
        super().__init__()
        self.channels, self.num_prefix_tokens = channels, num_prefix_tokens
        self.kernel = nn.Parameter(gaussian_kernel(kernel_size).to(**dd))
        if num_prefix_tokens:  # the reference's init: uniform in [0, 1)
            self.alpha = nn.Parameter(torch.rand(num_prefix_tokens, 1, **dd))
            self.beta = nn.Parameter(torch.rand(num_prefix_tokens, 1, **dd))
        self.implementation = AUTO

    @property
    def implementation(self) -> str:
        """As DepthwiseMixer's."""
        return self._implementation

    @implementation.setter
    def implementation(self, name: str) -> None:
        self._implementation = check_implementation(name)
        self._banded, self._ones = ParameterCache(), ParameterCache()

    def scalars(self) -> Dict[str, nn.Parameter]:
        return {n: self._parameters[n] for n in ("alpha", "beta") if n in self._parameters}

    def _mix(self, v: torch.Tensor, grid_size: Tuple[int, int], how: str = "conv",
             shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        k = self.kernel.shape[-1]
        return depthwise_mix(v, self.kernel.expand(v.shape[-1], 1, k, k), self._parameters.get("alpha"),
                             self._parameters.get("beta"), grid_size, head_dim=v.shape[-1], how=how, shift=shift)

    def token_map(self, grid_size: Tuple[int, int]) -> torch.Tensor:
        """T [N, N] (rows: the token written, columns: the token read) for an h x w grid."""
        h, w = grid_size
        N = self.num_prefix_tokens + h * w
        return banded_matrix(functools.partial(self._mix, grid_size=grid_size), N, 1, self.kernel)[..., 0].T

    def of_ones(self, grid_size: Tuple[int, int]) -> torch.Tensor:
        """T applied to a constant 1 on every token, [N, 1]: on a patch p, S(p) (the sum of the taps
        that fall on the grid) x (1 + sum of beta); on prefix token j, 1 + alpha[j]. What a bias
        added before the mixing becomes after it; cached while the parameters keep their values."""
        h, w = grid_size
        ones = self.kernel.new_ones(1, self.num_prefix_tokens + h * w, 1)
        return self._ones.get(grid_size, list(self.parameters()), lambda: self._mix(ones, grid_size)[0])

    def forward(self, v: torch.Tensor, grid_size: Tuple[int, int],
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """T(v), or T(v + shift) for a shift [C] on every token (see mixing.depthwise_mix)."""
        how = self._how(v, grid_size)
        if how == "banded":
            params = list(self.parameters())
            return self._banded.get(grid_size, params, lambda: self.token_map(grid_size)) @ (
                v if shift is None else v + shift)
        return self._mix(v, grid_size, how, shift)


def make_mixer(variant: str, heads: int, head_dim: int, num_prefix_tokens: int, kernel_size: int,
               grid_size: Tuple[int, int], **dd) -> Mixer:
    """The mixer of `variant` for `heads` heads of width `head_dim` (see the module docstring)."""
    if variant in ("depthwise", "depthwise_global"):
        return DepthwiseMixer(heads, head_dim, num_prefix_tokens, kernel_size,
                              global_term=variant == "depthwise_global", **dd)
    if variant == "fixed":
        return FixedMixer(heads, head_dim, num_prefix_tokens, kernel_size, grid_size, **dd)
    if variant == "identity":
        return IdentityMixer()
    if variant == "drop":
        return DropMixer()
    raise ConvHeadsError(f"no mixer for variant {variant!r}")
