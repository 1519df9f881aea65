"""DSP (differentiable subset pruning): learn which blocks (or heads) to replace while recovering.

One gate logit per block (or per head). During recovery fine-tuning every gated block computes
both branches on the same values and mixes them per head,

    y_h = w_g * mix(V_h) + (1 - w_g) * attention(V_h)        (then W_O, as the block always did)

with w from a Gumbel soft top-k over all the model's gates (k = the budget): weights in [0, 1]
that sum to k and become the hard k-hot of the k largest (logit + noise) as the temperature falls.
The temperature falls log-linearly, start -> end, over the annealing steps, then stays at end.
The noise is drawn from a generator seeded by (seed, step): the same on every DDP process and on
a resumed run. In evaluation mode (validation during training) the hard top-k of the logits is
used, without noise: validation scores the model `finalise` will return.

`finalise` turns the hard top-k into an ordinary Selection: selected heads become ConvHeadAttention
heads holding their trained mixing parameters, unselected blocks get their original attention
back; the model is then exactly a replaced model (save_model, load_model and ONNX as usual).

    gates = gate_model(model, k=3, granularity="block", anneal_steps=epochs * steps_per_epoch)
    train(model, ...)                      # the gates train with everything else, own lr group
    selection = finalise(model)
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from .errors import ConvHeadsError
from .fitting import fit_mixing, for_heads
from .layers import CONV_VARIANTS, ConvHeadAttention, ReplacedAttention
from .mixers import DepthwiseMixer
from .scoring import HeadScores
from .selection import GRANULARITIES, Selection
from .surgery import INITS, track_grid_size
from .vit import as_vit, vit_info

GATES = "dsp_gates"     # the attribute of the model that holds its gates while it is gated
GATE_LR = 0.01          # the gates' own learning rate (no weight decay)


@dataclass(frozen=True, kw_only=True)
class DSPSettings:
    """How the gates learn: their temperature schedule and learning rate."""
    temperature_start: float = 1.0
    """The Gumbel soft top-k's temperature at the first step; it falls log-linearly ..."""
    temperature_end: float = 1e-3
    """... to this, then stays there."""
    gate_lr: float = GATE_LR
    """The gates' own learning rate (no weight decay)."""

    def __post_init__(self):
        check_schedule(self.temperature_start, self.temperature_end)
        if not self.gate_lr > 0:
            raise ConvHeadsError(f"the gates' learning rate must be positive; got gate_lr={self.gate_lr}")


def soft_topk(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Relaxed top-k: w_i = sigmoid((s_i - theta) / temperature) with the threshold theta at which
    the weights sum to k. Weights in (0, 1) summing to k; as the temperature goes to 0, the k-hot of
    the k largest scores. Add Gumbel noise to the scores for a sample of a k-subset.

    theta is found by bisection (no gradient), then moved by one Newton step whose value is ~0 but
    whose gradient is theta's implicit one, d theta / d s_i = sigmoid'_i / sum_j sigmoid'_j (where
    the weights are already hard, sigmoid' vanishes and theta needs no gradient). In float64."""
    check_k(k, len(scores))
    s = scores.double()
    with torch.no_grad():
        lo, hi = s.min() - 40 * temperature, s.max() + 40 * temperature  # sums: ~n and ~0
        for _ in range(200):
            mid = (lo + hi) / 2
            if torch.sigmoid((s - mid) / temperature).sum() > k:
                lo = mid
            else:
                hi = mid
        theta = (lo + hi) / 2
    w = torch.sigmoid((s - theta) / temperature)
    slope = (w * (1 - w)).sum() / temperature
    if slope.item() > 1e-12:
        theta = theta + (w.sum() - k) / slope
        w = torch.sigmoid((s - theta) / temperature)
    return w.to(scores.dtype)


def gumbel(n: int, seed: int, step: int) -> torch.Tensor:
    """n Gumbel(0, 1) draws from a generator seeded by (seed, step): every process draws the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(u))


def temperature_at(step: int, start: float, end: float, steps: int) -> float:
    """Log-linear from start (step 0) to end (step `steps` - 1), then end."""
    if steps <= 1:
        return end
    return start * (end / start) ** min(1.0, step / (steps - 1))


def check_k(k, gates: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= gates:
        raise ConvHeadsError(f"DSP keeps k of {gates} gates: k must be an integer from 1 to {gates}; got {k!r}")


def check_schedule(start: float, end: float) -> None:
    if not (start > 0 and end > 0):
        raise ConvHeadsError(f"DSP temperatures must be positive; got start {start}, end {end}")
    if end > start:
        raise ConvHeadsError(f"the DSP temperature must fall (anneal from start to end), but end {end} > start "
                             f"{start}; e.g. start 1.0, end 0.001")


class DSPGates(nn.Module):
    """The gate logits and their schedule. `forward()` gives the weight of the convolution branch
    per gate: a Gumbel soft top-k sample in training (one per call: `step` counts them), the hard
    top-k of the logits in evaluation."""

    def __init__(self, num_gates: int, k: int, granularity: str, anneal_steps: int, start: float = 1.0,
                 end: float = 1e-3, seed: int = 0, lr: float = GATE_LR):
        super().__init__()
        check_k(k, num_gates)
        check_schedule(start, end)
        self.k, self.granularity, self.anneal_steps = k, granularity, anneal_steps
        self.start, self.end, self.seed, self.lr = start, end, seed, lr
        self.logits = nn.Parameter(torch.zeros(num_gates))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # in the checkpoint: a resume continues

    @property
    def temperature(self) -> float:
        return temperature_at(int(self.step), self.start, self.end, self.anneal_steps)

    def chosen(self) -> List[int]:
        """The k gates with the largest logits (ties: the lower index), sorted."""
        return sorted(torch.argsort(-self.logits.detach(), stable=True)[:self.k].tolist())

    def hard(self) -> torch.Tensor:
        w = torch.zeros_like(self.logits)
        w[self.chosen()] = 1
        return w

    def expected(self) -> torch.Tensor:
        """The soft top-k at the current temperature without noise (what the logs show)."""
        with torch.no_grad():
            return soft_topk(self.logits.double(), self.k, self.temperature).float()

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.hard()
        noise = gumbel(len(self.logits), self.seed, int(self.step)).to(self.logits)
        w = soft_topk(self.logits + noise, self.k, self.temperature)
        self.step += 1
        return w


class GatedAttention(ReplacedAttention):
    """A block's attention with every head both attending and mixed as the replacement would,
    per head y_h = w_h * mix(V_h) + (1 - w_h) * attention(V_h), then the block's own W_O. The
    original timm Attention is kept whole (`attn`); its W_V feeds both branches, so a head that
    ends up replaced keeps the W_V and W_O it was trained with."""

    def __init__(self, attn: Attention, grid_size: Tuple[int, int], num_prefix_tokens: int, kernel_size: int = 3,
                 variant: str = "depthwise"):
        if variant not in CONV_VARIANTS:
            raise ConvHeadsError(f"DSP gates a convolution branch: variant must be one of {CONV_VARIANTS}; "
                                 f"got {variant!r}")
        super().__init__(attn, range(attn.num_heads), grid_size, num_prefix_tokens, kernel_size, variant)
        self.attn = attn
        self.mixer = DepthwiseMixer(self.num_heads, self.head_dim, num_prefix_tokens, kernel_size,
                                    global_term=variant == "depthwise_global", device=attn.qkv.weight.device,
                                    dtype=attn.qkv.weight.dtype)
        self.weight: Optional[torch.Tensor] = None  # [heads], set by the model's gates before every forward

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise ConvHeadsError("a gated block ran without gate weights: call the model, not the block")
        a = self.attn
        B, N, C = x.shape
        q, k, v = a.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        attended = attended.transpose(1, 2)                                          # [B, N, heads, d]
        mixed = self.mixer(v.transpose(1, 2).reshape(B, N, C), self.grid_size).view(B, N, self.num_heads, self.head_dim)
        w = self.weight.to(x.dtype)[:, None]                                         # [heads, 1]
        out = (attended + w * (mixed - attended)).reshape(B, N, C)
        return a.proj(a.norm(out))


def _gated_blocks(model: nn.Module) -> List[GatedAttention]:
    return [b.attn for b in as_vit(model).blocks if isinstance(b.attn, GatedAttention)]


def _apply_gates(model: nn.Module, args) -> None:
    """Forward pre-hook of a gated model: one draw of the gates for the whole forward pass. A plain
    function of the module it runs on, so a deep copy (an EMA of the model) uses its own gates."""
    gates: DSPGates = getattr(model, GATES)
    w = gates()
    blocks = as_vit(model).blocks  # the backbone's, in a segmentation model
    heads = blocks[0].attn.num_heads
    for b, block in enumerate(blocks):
        block.attn.weight = w[b].expand(heads) if gates.granularity == "block" else w[b * heads:(b + 1) * heads]


def gate_model(
        model: nn.Module,
        k: int,
        granularity: str = "block",
        anneal_steps: int = 1,
        temperature: Tuple[float, float] = (1.0, 1e-3),
        kernel_size: int = 3,
        init: str = "gaussian",
        variant: str = "depthwise",
        scores: Optional[HeadScores] = None,
        seed: int = 0,
        lr: float = GATE_LR,
) -> DSPGates:
    """Gate every block of `model` (in place): k of its blocks (or heads, by granularity) will be
    replaced. anneal_steps: training forward passes over which the temperature falls from
    temperature[0] to temperature[1]. init, variant, kernel_size, scores: as replace_heads (the
    mixing of every head starts where replace_heads would start it). Returns the gates (also
    `model.dsp_gates`); their logits start at 0, so the first choices are the noise's."""
    info, blocks = vit_info(model), as_vit(model).blocks
    if granularity not in GRANULARITIES:
        raise ConvHeadsError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    num_gates = info.depth if granularity == "block" else info.depth * info.num_heads
    check_k(k, num_gates)
    check_schedule(*temperature)
    if init not in INITS:
        raise ConvHeadsError(f"init must be one of {INITS}; got {init!r}")
    if init == "attention" and scores is None:
        raise ConvHeadsError('init="attention" needs the scores (score_heads)')
    if hasattr(model, GATES) or any(isinstance(b.attn, ReplacedAttention) for b in blocks):
        raise ConvHeadsError("DSP gates the original model: this one already has gated or replaced blocks")
    layers = [GatedAttention(b.attn, info.grid_size, info.num_prefix_tokens, kernel_size, variant)
              for b in blocks]
    if init == "attention":
        fit = fit_mixing(scores, kernel_size, variant)
        for b, layer in enumerate(layers):
            layer.init_from_fit(for_heads(fit, b, range(info.num_heads)))
    for block, layer in zip(blocks, layers):
        block.attn = layer
    gates = DSPGates(num_gates, k, granularity, anneal_steps, *temperature, seed=seed,
                     lr=lr).to(next(model.parameters()).device)
    setattr(model, GATES, gates)
    model._dsp_hook = model.register_forward_pre_hook(_apply_gates)
    if info.dynamic_img_size:
        track_grid_size(as_vit(model))
    return gates


def gates_of(model: nn.Module) -> Optional[DSPGates]:
    return getattr(model, GATES, None)


def gate_groups(model: nn.Module) -> List[Dict]:
    """The optimiser group of the gates (their own lr, no weight decay), if the model is gated."""
    gates = gates_of(model)
    return [{"params": [gates.logits], "lr": gates.lr, "weight_decay": 0.0}] if gates is not None else []


def selection_of(gates: DSPGates, depth: int, num_heads: int) -> Selection:
    """The hard top-k of the gates as a Selection."""
    return Selection.from_units(gates.chosen(), gates.granularity, num_heads, depth)


@torch.no_grad()
def finalise(model: nn.Module) -> Selection:
    """Replace the hard top-k heads of a gated model (in place) and ungate it; return the Selection.
    The result is an ordinary replaced model: what replace_heads builds, with the trained weights."""
    gates = gates_of(model)
    if gates is None:
        raise ConvHeadsError("the model has no DSP gates (convheads.dsp.gate_model) to finalise")
    layers = _gated_blocks(model)
    first = layers[0]
    blocks = as_vit(model).blocks
    selection = selection_of(gates, len(blocks), first.num_heads)
    for b, (block, layer) in enumerate(zip(blocks, layers)):
        heads = selection.heads.get(b)
        if not heads:
            block.attn = layer.attn
            continue
        replaced = ConvHeadAttention(layer.attn, heads, layer.grid_size, layer.num_prefix_tokens,
                                     layer.kernel_size, layer.variant)
        channels = torch.tensor([h * layer.head_dim + j for h in heads for j in range(layer.head_dim)])
        replaced.mixer.conv.weight.copy_(layer.mixer.conv.weight[channels])
        for name, p in replaced.mixer.scalars().items():  # per-head parameters: heads on the last axis
            p.copy_(layer.mixer.scalars()[name][..., heads])
        replaced.mixing = layer.mixing
        block.attn = replaced
    model._dsp_hook.remove()
    del model._dsp_hook
    delattr(model, GATES)
    return selection


def gate_log(gates: DSPGates, epoch: int) -> List[Dict]:
    """One row per gate for the per-epoch log: its logit and noiseless soft top-k weight."""
    return [{"epoch": epoch, "gate": g, "logit": float(logit), "weight": float(w), "temperature": gates.temperature}
            for g, (logit, w) in enumerate(zip(gates.logits.tolist(), gates.expected().tolist()))]
