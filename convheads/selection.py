"""Which heads to replace: by score or from an explicit mapping.

Methods (`METHODS`, the `select.method` of the pipeline) rank the heads (or blocks) and take the first:
  sigma      lowest Sigma_h (Sigma_b) first: the heads whose attention depends least on the input
  fit        highest fit score first (fitting.fit_scores): the heads whose mean attention the
             replacement variant in use represents best (depthwise: band + prefix terms;
             depthwise_global: also the uniform level)
  sigma_fit  lowest sum of the two ranks first (ties: the lower Sigma). Ranks, not a product or a
             sum of the scores: Sigma is a sum of standard deviations over N^2 entries (its scale
             depends on the token count and the model), fit a bounded fraction; ranks are
             scale-free and give "input-independent" and "representable" an equal say.
  random     a seeded random order: the control that says whether the scores earn their keep.
  sigma_high highest Sigma_h (Sigma_b) first: the control on the other side, the heads whose
             attention depends most on the input (Sigma's ranking is worth something only if
             sigma beats it).
"""
import json
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from .errors import ConvHeadsError
from .fitting import FITTED, fit_scores
from .scoring import HeadScores

GRANULARITIES = ("head", "block")
METHODS = ("sigma", "fit", "sigma_fit", "random", "sigma_high")


class Selection:
    """A set of heads to replace: block index -> sorted head indices.

    `depth` and `num_heads` record the model the selection was made for (select_heads fills them
    in); when known, applying the selection to a model of another shape is an error. A mapping
    written by hand (e.g. the paper's published block lists) is checked against the model on use.
    """

    def __init__(self, heads: Mapping[int, Iterable[int]], depth: Optional[int] = None,
                 num_heads: Optional[int] = None):
        clean: Dict[int, List[int]] = {}
        for block, hs in heads.items():
            hs = list(hs)
            if not _is_index(block) or not all(_is_index(h) for h in hs):
                raise ConvHeadsError(f"selection indices must be non-negative integers; got block {block!r}: {hs!r}")
            if len(set(hs)) != len(hs):
                raise ConvHeadsError(f"selection lists a head twice in block {block}: {hs}")
            if hs:
                clean[int(block)] = sorted(int(h) for h in hs)
        self.heads = dict(sorted(clean.items()))
        self.depth, self.num_heads = depth, num_heads

    @classmethod
    def from_blocks(cls, blocks: Iterable[int], num_heads: int, depth: Optional[int] = None) -> "Selection":
        """Every head of each listed block (blockwise replacement)."""
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks):
            raise ConvHeadsError(f"selection lists a block twice: {blocks}")
        return cls({b: range(num_heads) for b in blocks}, depth=depth, num_heads=num_heads)

    @classmethod
    def from_units(cls, units: Iterable[int], granularity: str, num_heads: int, depth: int) -> "Selection":
        """Whole blocks by index ("block"), or heads by flat index block * num_heads + head ("head")."""
        if granularity == "block":
            return cls.from_blocks(units, num_heads=num_heads, depth=depth)
        heads: Dict[int, List[int]] = {}
        for flat in units:
            heads.setdefault(flat // num_heads, []).append(flat % num_heads)
        return cls(heads, depth=depth, num_heads=num_heads)

    @property
    def num_replaced(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def check(self, depth: int, num_heads: int) -> None:
        """Raise if the selection does not fit a model with `depth` blocks of `num_heads` heads."""
        if self.depth not in (None, depth) or self.num_heads not in (None, num_heads):
            raise ConvHeadsError(
                f"the selection was made for a model with {self.depth} blocks x {self.num_heads} heads, "
                f"but this model has {depth} x {num_heads}; score and select on this model")
        for block, hs in self.heads.items():
            if block >= depth:
                raise ConvHeadsError(
                    f"the selection names block {block} but the model has {depth} blocks (0..{depth - 1}); "
                    f"was it made for another model?")
            if hs[-1] >= num_heads:
                raise ConvHeadsError(
                    f"the selection names head {hs[-1]} of block {block} but the model has {num_heads} heads "
                    f"per block (0..{num_heads - 1}); was it made for another model?")

    def to_dict(self) -> dict:
        return {"heads": {str(b): h for b, h in self.heads.items()}, "depth": self.depth, "num_heads": self.num_heads}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Selection":
        if "heads" not in d:
            raise ConvHeadsError("a selection file needs a 'heads' mapping of block -> head indices")
        try:
            heads = {int(b): h for b, h in d["heads"].items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise ConvHeadsError(f"selection 'heads' must map block indices to lists of head indices: {e}") from None
        return cls(heads, depth=d.get("depth"), num_heads=d.get("num_heads"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __eq__(self, other) -> bool:
        return isinstance(other, Selection) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Selection({self.heads})"


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _units(depth: int, num_heads: int, granularity: str) -> int:
    """How many heads ("head") or blocks ("block") a model has to select from."""
    if granularity not in GRANULARITIES:
        raise ConvHeadsError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    return depth * num_heads if granularity == "head" else depth


def check_count(count, depth: int, num_heads: int, granularity: str = "head") -> None:
    """Raise unless `count` heads (or blocks) can be selected from a model of depth x num_heads."""
    units = _units(depth, num_heads, granularity)
    if not _is_index(count) or not 1 <= count <= units:
        raise ConvHeadsError(f"count must be an integer from 1 to {units} (the model's {granularity}s); got {count!r}")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConvHeadsError(f"selection method must be one of {METHODS}; got {method!r}")
    return method


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0 for the smallest value, ties by index."""
    ranks = torch.empty(len(values), dtype=torch.long)
    ranks[torch.argsort(values, stable=True)] = torch.arange(len(values))
    return ranks


def ranking(scores: HeadScores, method: str = "sigma", granularity: str = "head", kernel_size: int = 3,
            seed: int = 0, variant: str = "depthwise") -> torch.Tensor:
    """The heads (flat index block * heads + head) or blocks, in the order `method` replaces them
    (`seed`: the random order's; `variant`: whose fit "fit" and "sigma_fit" rank by)."""
    check_method(method)
    depth, num_heads = scores.sigma_h.shape
    units = _units(depth, num_heads, granularity)
    if method == "random":
        return torch.randperm(units, generator=torch.Generator().manual_seed(seed))
    sigma = scores.sigma_h if granularity == "head" else scores.sigma_b[:, None]
    if method == "sigma":
        return torch.argsort(sigma.flatten(), stable=True)
    if method == "sigma_high":
        return torch.argsort(-sigma.flatten(), stable=True)
    if variant not in FITTED:
        raise ConvHeadsError(f"select method {method!r} ranks heads by how well the replacement fits their mean "
                             f"attention, and variant {variant!r} has no attention fit (variants with one: {FITTED}); "
                             f"use method 'sigma'")
    fit = fit_scores(scores, kernel_size, variant).double()
    fit = (fit if granularity == "head" else fit.mean(dim=1, keepdim=True)).flatten()
    if method == "fit":
        return torch.argsort(-fit, stable=True)
    by_sigma = _ranks(sigma.flatten())
    combined = (by_sigma + _ranks(-fit)) * len(fit) + by_sigma     # rank sum, then the lower Sigma
    return torch.argsort(combined, stable=True)


def select_heads(
        scores: HeadScores,
        count: Optional[int] = None,
        fraction: Optional[float] = None,
        granularity: str = "head",
        method: str = "sigma",
        kernel_size: int = 3,
        seed: int = 0,
        variant: str = "depthwise",
) -> Selection:
    """The first `count` (or `fraction` of all) heads ("head") or whole blocks ("block") by `method`
    (see METHODS above; "fit" and "sigma_fit" score the fit of `variant`'s k x k kernel, `kernel_size`;
    "random" draws its order from `seed`).

    Ties are broken by index, so the result is deterministic.
    """
    depth, num_heads = scores.sigma_h.shape
    units = _units(depth, num_heads, granularity)
    check_method(method)
    if (count is None) == (fraction is None):
        raise ConvHeadsError("give exactly one of count= or fraction=")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConvHeadsError(f"fraction must be in (0, 1]; got {fraction}")
        count = max(1, round(fraction * units))
    check_count(count, depth, num_heads, granularity)
    order = ranking(scores, method, granularity, kernel_size, seed, variant)[:count].tolist()
    return Selection.from_units(order, granularity, num_heads, depth)
