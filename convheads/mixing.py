"""The spatial mixing of replaced heads: prefix-token scalars, then a depthwise k x k convolution
of the patch grid (plus, optionally, a global term); one function, three implementations that compute it.

    prefix_out[j] = v_prefix[j] + alpha[j, i] * mean(V_i over patches)       (per mixed head i)
    patches_out   = conv_k(V_i(patches) + sum_j beta[j, i] * v_prefix[j])    (stride 1, zero "same" padding)

With the global term (variant "depthwise_global", see layers.py) a head i also has gamma[i] and a
P x P prefix mixing phi[:, :, i], and its prefix tokens are mixed like attention mixes them:

    prefix_out[j] = sum_j' phi[j, j', i] v_prefix[j'] + alpha[j, i] * mean(V_i over patches)
    patches_out   = conv_k(...as above...) + gamma[i] * mean(V_i over all N tokens)

Implementations (`IMPLEMENTATIONS`), all on channels-last views of the values (no layout copies):
  conv    the library's depthwise convolution (oneDNN on CPU, cuDNN on GPU). On a CPU a call costs
          ~40 us whatever the size: more than the whole attention on a tiny grid.
  shift   the k^2 shifted windows of the zero-padded grid (one strided view) times the taps,
          summed. torch.compile fuses it with the prefix scalars into one loop, which beats
          calling the library convolution from compiled code on all but large inputs; in eager
          mode it wins at batch 1 on mid-size grids.
  banded  the [N, N] token-mixing matrix per channel that the whole function equals (prefix
          scalars included: the fixed banded matrix that a convolution-like head's attention is), applied as one
          multiply and one sum: the cheapest on tiny grids. Built on every call while gradients
          flow; without them built once and reused while the parameters keep their values.
`choose` picks one per call from its shape, device and mode (gradients, torch.compile, ONNX
export): a given kind of call always takes the same path. All three agree to float rounding.
"""
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import ConvHeadsError

IMPLEMENTATIONS = ("conv", "shift", "banded")
AUTO = "auto"
# "banded" multiplies out a [B, N, N, C] product and reads an [N, N, C] matrix; above this many
# elements (B N^2 C) another path is faster. Measured in a chain of 6 distinct layers, as in a model,
# whose other layers evict each layer's matrix from the cache (one layer timed alone keeps it there
# and favours banded up to twice as far): CPU eager, widths 128-768, grids 4-12, batch 1 and 8.
# Without prefix tokens banded wins up to 197k elements and loses from 262k; with them (4 more ops
# on the other paths) it wins up to 296k and loses from 526k.
BANDED_MAX_ELEMENTS = 200_000
BANDED_MAX_ELEMENTS_PREFIX = 400_000
# Past banded, at batch 1, shift beats the library convolution by 5-20% up to about this many patch
# values (B x h x w x C; with or without prefix tokens); at batch 8 the convolution wins everywhere.
SHIFT_MAX_VALUES_EAGER = 25_000
# Under torch.compile the fused shift loop beats the library convolution called from compiled
# code up to about this many values (B x h x w x C); above it, the library's blocked kernel wins.
SHIFT_MAX_VALUES_COMPILED = 300_000


def check_implementation(name: str) -> str:
    if name != AUTO and name not in IMPLEMENTATIONS:
        raise ConvHeadsError(f"mixing implementation must be {AUTO!r} or one of {IMPLEMENTATIONS}; got {name!r}")
    return name


def _exporting() -> bool:
    """Inside an ONNX export. Every export traces (TorchScript's tracer or torch.export), and the
    cheap tracing flags come first: is_in_onnx_export imports two modules per call (~1 us, a few
    times per layer call in eager mode)."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def choose(batch: int, tokens: int, channels: int, prefix: int, device: torch.device) -> str:
    """The fastest implementation for a call (measured with benchmarks/layer_speed.py)."""
    if _exporting():
        return "conv"        # one ONNX Conv node, which runtimes and TensorRT optimise
    patches = batch * (tokens - prefix) * channels
    if torch.compiler.is_compiling():  # inductor fuses shift with the prefix scalars into one loop
        return "shift" if patches <= SHIFT_MAX_VALUES_COMPILED else "conv"
    if device.type == "cpu" and not torch.is_grad_enabled():
        if batch * tokens * tokens * channels <= (BANDED_MAX_ELEMENTS_PREFIX if prefix else BANDED_MAX_ELEMENTS):
            return "banded"
        if batch == 1 and patches <= SHIFT_MAX_VALUES_EAGER:
            return "shift"
    return "conv"


def addcmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a + b * c: one fused op in PyTorch; plain ops in an ONNX export, where addcmul's float32
    constant would turn a float16 graph float32 (onnxruntime then refuses the mixed LayerNorm)."""
    return a + b * c if _exporting() else torch.addcmul(a, b, c)


def _spatial(grid: torch.Tensor, weight: torch.Tensor, how: str) -> torch.Tensor:
    """Depthwise k x k convolution (zero "same" padding) of grid [B, h, w, C] -> [B, h, w, C]."""
    B, h, w, C = grid.shape
    k = int(weight.shape[-1])  # plain ints, also while tracing for export
    if how == "conv":  # a channels-last view in, a channels-last result out: no copies
        return F.conv2d(grid.permute(0, 3, 1, 2), weight, None, 1, k // 2, 1, C).permute(0, 2, 3, 1)
    # shift: the k^2 shifted windows of the zero-padded grid are one strided view [k, k, B, h, w, C]
    # (no copy); multiply by the taps and sum over the outermost dimension (the fast way round).
    r, h, w = k // 2, int(h), int(w)
    padded = F.pad(grid, (0, 0, r, r, r, r))
    sb, sy, sx, _ = padded.stride()
    windows = padded.as_strided((k, k, B, h, w, C), (sy, sx, sb, sy, sx, 1))
    taps = weight.view(C, k * k).t().contiguous().view(k, k, 1, 1, 1, C)  # contiguous: a fast multiply
    return (windows * taps).flatten(0, 1).sum(dim=0)


def token_mean(v: torch.Tensor, start: int = 0) -> torch.Tensor:
    """v [B, N, C] -> [B, 1, C], the mean over tokens start..N-1, as one matrix product with a row of
    weights that is zero on the first `start` tokens: onnxruntime's ReduceMean over the token axis of
    a ViT-L block costs 4x the GEMV (0.8 vs 0.2 ms), and slicing the tokens out first one more pass."""
    n = v.shape[1] - start
    return torch.cat([v.new_zeros(1, start), v.new_full((1, n), 1.0 / n)], dim=1) @ v


def depthwise_mix(v: torch.Tensor, weight: torch.Tensor, alpha: Optional[torch.Tensor],
                  beta: Optional[torch.Tensor], grid_size: Tuple[int, int], head_dim: int,
                  how: str = "conv", gamma: Optional[torch.Tensor] = None,
                  phi: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mix values v [B, P + h*w, C] (C = heads x head_dim) -> the same shape, the convolution done
    by `how` ("conv" or "shift"). weight [C, 1, k, k]; alpha, beta [P, heads] (None when P = 0);
    with the global term: gamma [heads] and phi [P, P, heads] (None when P = 0). shift [C]: mix
    v + shift instead, at no pass over v of its own when there are prefix tokens (it rides on the
    small prefix tensors and on the row that the patches get from them anyway)."""
    B, N, C = v.shape
    h, w = grid_size
    P = N - h * w
    heads = v.unflatten(-1, (-1, head_dim))       # [B, N, heads, d]: per-head scalars broadcast, no copies
    # Few, fused ops: at the digits' 65 tokens every op costs more than its arithmetic.
    prefix, patches = heads[:, :P], heads[:, P:]
    patch_mean = token_mean(v, P).unflatten(-1, (-1, head_dim)) if P else None   # [B, 1, heads, d]
    s = shift.view(-1, head_dim) if shift is not None else None                  # [heads, d]
    if s is not None:
        prefix = prefix + s
        patch_mean = patch_mean + s if P else None
        patches = patches + (s + (prefix * beta[..., None]).sum(dim=1, keepdim=True) if P else s)
    elif P == 1:
        patches = addcmul(patches, prefix, beta[..., None])
    elif P:
        patches = patches + (prefix * beta[..., None]).sum(dim=1, keepdim=True)
    y = _spatial(patches.reshape(B, h, w, C), weight, how).reshape(B, h * w, C)
    if gamma is not None:  # + gamma_i x the mean of head i's values over all N tokens, on every patch
        v_mean = token_mean(v).unflatten(-1, (-1, head_dim))
        y = addcmul(y.unflatten(-1, (-1, head_dim)), v_mean if s is None else v_mean + s, gamma[:, None]).flatten(2)
    if not P:
        return y
    if gamma is None:
        prefix_out = addcmul(prefix, alpha[..., None], patch_mean)
    else:
        mixed = prefix * phi[0, 0, :, None] if P == 1 else (prefix[:, None] * phi[..., None]).sum(dim=2)
        prefix_out = addcmul(mixed, alpha[..., None], patch_mean)
    return torch.cat([prefix_out.flatten(2), y], dim=1)


def banded_matrix(mix: Callable[[torch.Tensor], torch.Tensor], tokens: int, channels: int,
                  like: torch.Tensor) -> torch.Tensor:
    """M [N, N, C] with mix(v)[b, p, c] = sum_q M[q, p, c] v[b, q, c], for any token mixing that is
    linear and acts on each channel alone: `mix` fed the N unit token vectors (row q: where token q
    goes), so it is the same function by construction."""
    units = torch.eye(tokens, dtype=like.dtype, device=like.device)[:, :, None].expand(tokens, tokens, channels)
    return mix(units).contiguous()


def apply_banded(v: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """v [B, N, C], matrix [N (from), N (to), C] -> [B, N, C]. The sum runs over the outermost
    dimension of the product: twice as fast as over an inner one."""
    return (matrix[:, None] * v.transpose(0, 1)[:, :, None]).sum(dim=0)


class ParameterCache:
    """A tensor computed from parameters, reused while they keep their values.

    Only without gradients and outside torch.compile / tracing (there it is computed every call,
    so gradients and graphs see the parameters). Values are compared rather than version counters,
    which writes through `.data` do not bump."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._key: Optional[Hashable] = None
        self._params: List[torch.Tensor] = []
        self._value: Optional[torch.Tensor] = None

    def _holds(self, key: Hashable, params: Sequence[torch.Tensor]) -> bool:
        return (self._value is not None and key == self._key and len(params) == len(self._params)
                and all(c.dtype == p.dtype and c.device == p.device and c.shape == p.shape and torch.equal(c, p)
                        for c, p in zip(self._params, params)))

    def get(self, key: Hashable, params: Sequence[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return compute()
        if not self._holds(key, params):
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable outside inference mode
                self._key, self._params, self._value = key, [p.detach().clone() for p in params], compute()
        return self._value
