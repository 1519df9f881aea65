"""One attention module against the layer that replaces it, across sizes (the suite's `layers` section).

At every point (a g x g patch grid, width C, P prefix tokens, batch B, variant) it builds timm's
Attention(C, heads) with random weights and the ConvHeadAttention that whole-block replacement
makes of it (every head "depthwise" or "depthwise_global", 3 x 3, random prefix scalars and global
terms), and times the pair interleaved in each runtime: PyTorch eager, torch.compile (inductor),
and exported to ONNX in onnxruntime (in a process of its own, see timing.py). Each side is a chain
of `depth` distinct layers (6 by default, as in the digits model) and the time is per layer: a layer
timed alone keeps its weights (and the banded path its [N, N, C] matrix) in the CPU cache, which in
a model the other layers evict; alone, banded looked up to twice as good as it is in a model.
ratio = replaced / original latency: below 1, the replacement is faster. Each pair gets about
`budget_s` of timed rounds (at least `min_rounds`).

    python -m benchmarks.suite --sections layers                      # the full grid (long)
    python -m benchmarks.suite --sections layers --layer-grids 4 8 --layer-batches 1
    python -m benchmarks.suite --sections layers --layer-grids 8 --layer-widths 128 --layer-prefixes 1 \
        --layer-variants depthwise depthwise_global     # the digits default's layer, both variants
"""
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.layers import Attention
from torch import nn
from tqdm.auto import tqdm

from convheads import ConvHeadAttention, ConvHeadsError
from convheads.engine.timing import OnnxTimer, check_repeats, time_within
from convheads.export import export_module
from convheads.files import atomic_path
from convheads.mixing import SHIFT_MAX_VALUES_COMPILED, choose

GRIDS = (4, 8, 14, 16, 24, 37)
HEADS = {128: 8, 384: 6, 768: 12, 1024: 16}   # width -> heads: the digits default, ViT-S, ViT-B, ViT-L
PREFIXES = (0, 1, 5)
BATCHES = (1, 64)
RUNTIMES = ("eager", "compile", "onnxruntime")
LAYER_VARIANTS = ("depthwise", "depthwise_global")
DEPTH = 6


@dataclass(frozen=True)
class Point:
    grid: int
    width: int
    prefix: int
    batch: int
    variant: str = "depthwise"
    depth: int = DEPTH   # distinct layers chained per timed call

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid * self.grid

    def build(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, nn.Module]:
        """`depth` attention modules (random weights, seeded) and their replacements, each chained, in eval mode."""
        heads = HEADS.get(self.width, max(1, self.width // 64))
        originals, replaced = [], []
        with torch.random.fork_rng(devices=[]):
            for i in range(self.depth):
                torch.manual_seed(self.grid * 10_000 + self.width + self.prefix + 1_000_000 * i)
                originals.append(Attention(self.width, heads, qkv_bias=True))
                replaced.append(ConvHeadAttention(originals[-1], range(heads), (self.grid, self.grid), self.prefix,
                                                  variant=self.variant))
                for p in replaced[-1].mixing_parameters()[1:]:   # prefix scalars (and global terms): not their init
                    nn.init.uniform_(p)
        return tuple(nn.Sequential(*layers).to(device, dtype).eval() for layers in (originals, replaced))

    def inputs(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.batch, self.tokens, self.width, generator=g).to(device, dtype)


def points(grids: Sequence[int] = GRIDS, widths: Sequence[int] = tuple(HEADS), prefixes: Sequence[int] = PREFIXES,
           batches: Sequence[int] = BATCHES, variants: Sequence[str] = ("depthwise",),
           depth: int = DEPTH) -> List[Point]:
    unknown = [v for v in variants if v not in LAYER_VARIANTS]
    if unknown:
        raise ConvHeadsError(f"layer variants must be among {LAYER_VARIANTS}; got {unknown}")
    bad = [w for w in widths if w not in HEADS and w % 64]
    if bad or any(g < 1 for g in grids) or any(p < 0 for p in prefixes) or any(b < 1 for b in batches) or depth < 1:
        raise ConvHeadsError(f"layer points need grids >= 1, prefixes >= 0, batches >= 1, depth >= 1 and widths in "
                             f"{list(HEADS)} or multiples of 64; got grids {list(grids)}, widths {list(widths)}, "
                             f"prefixes {list(prefixes)}, batches {list(batches)}, depth {depth}")
    return [Point(g, w, p, b, v, depth)
            for b in batches for w in widths for p in prefixes for g in grids for v in variants]


def _row(point: Point, runtime: str, mixing: str, times: Dict[str, List[float]], **extra) -> dict:
    t0, t1 = (statistics.median(times[side]) / point.depth for side in ("original", "replaced"))  # per layer
    return {"grid": point.grid, "tokens": point.tokens, "width": point.width, "prefix": point.prefix,
            "batch": point.batch, "variant": point.variant, "depth": point.depth, "runtime": runtime, "mixing": mixing,
            "original_us": t0 * 1e6, "replaced_us": t1 * 1e6, "ratio": t1 / t0, "rounds": len(times["original"]),
            # best of the rounds (timeit's choice): on a loaded machine, closer to the unloaded speed
            "ratio_best": min(times["replaced"]) / min(times["original"]),
            "threads": torch.get_num_threads(), **extra}


@torch.inference_mode()
def time_point(point: Point, runtimes: Sequence[str] = RUNTIMES, budget_s: float = 1.0, min_rounds: int = 5,
               device: str = "cpu", dtype: torch.dtype = torch.float32, onnx: Optional[OnnxTimer] = None,
               workdir: Optional[Path] = None) -> List[dict]:
    """One row per runtime: the pair's median latencies per layer (us), the ratio, and the largest
    difference of the runtime's replaced-chain output from eager PyTorch's."""
    original, replaced = point.build(device, dtype)
    x = point.inputs(device, dtype)
    expected = replaced(x)
    rows = []
    for runtime in runtimes:
        if runtime == "eager":
            models, mixing, extra = {"original": original, "replaced": replaced}, choose(
                point.batch, point.tokens, point.width, point.prefix, x.device), {}
        elif runtime == "compile":
            torch._dynamo.reset()  # every point is a new shape of the same code: no recompile limit
            models = {"original": torch.compile(original), "replaced": torch.compile(replaced)}
            start = time.perf_counter()
            models["original"](x)  # the first calls compile
            diff = float((models["replaced"](x) - expected).abs().max())
            mixing = "shift" if point.batch * point.grid ** 2 * point.width <= SHIFT_MAX_VALUES_COMPILED else "conv"
            extra = {"compile_s": time.perf_counter() - start, "max_abs_diff": diff}
        else:
            if onnx is None or x.device.type != "cpu":
                raise ConvHeadsError("onnxruntime points need an OnnxTimer and the CPU")
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                # (chains are Sequentials: the exporter would turn a layer's other forward arguments into inputs)
                paths = {name: export_module(m, x, Path(tmp) / f"{name}.onnx")
                         for name, m in (("original", original), ("replaced", replaced))}
                times, _ = onnx.time(paths, x.shape, torch.get_num_threads(), 1, min_rounds, budget_s)
            rows.append(_row(point, runtime, "conv", times))
            continue
        times = time_within(models, x, 2, budget_s, min_rounds)
        rows.append(_row(point, runtime, mixing, times, **extra))
    return rows


def layer_speed(pts: Sequence[Point], runtimes: Sequence[str] = RUNTIMES, budget_s: float = 1.0,
                min_rounds: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32,
                progress: bool = False) -> List[dict]:
    """time_point at every point; onnxruntime points share one timing process."""
    check_repeats(min_rounds, 0)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ConvHeadsError(f"unknown runtimes {unknown}; choose from {RUNTIMES}")
    if "onnxruntime" in runtimes and torch.device(device).type != "cpu":
        runtimes = [r for r in runtimes if r != "onnxruntime"]  # this runner is onnxruntime's CPU provider
    rows = []
    with OnnxTimer() as onnx:
        for point in tqdm(pts, desc="layers", unit="point", disable=not progress):
            rows += time_point(point, runtimes, budget_s, min_rounds, device, dtype, onnx)
    return rows


def plot_layers(rows: List[dict], path: Path) -> None:
    """A heat map of the ratio replaced / original per (batch, runtime): grids across, (width, prefix) down."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.colors import TwoSlopeNorm

    table = pd.DataFrame(rows)
    panels = [(b, r) for b in sorted(table.batch.unique()) for r in RUNTIMES if r in set(table.runtime)]
    norm = TwoSlopeNorm(vmin=min(0.2, table.ratio.min()), vcenter=1.0, vmax=max(1.5, table.ratio.max()))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.9 + 0.32 * table.groupby(
        ["width", "prefix", "variant"]).ngroups), squeeze=False)
    for ax, (batch, runtime) in zip(axes[0], panels):
        grid = table[(table.batch == batch) & (table.runtime == runtime)].pivot_table(
            index=["width", "prefix", "variant"], columns="grid", values="ratio")
        ax.imshow(grid.values, cmap="RdYlGn_r", norm=norm, aspect="auto")
        for (i, j), value in pd.DataFrame(grid.values).stack().items():
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [f"{g}x{g}" for g in grid.columns], fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [f"C={w} P={p}" + ("" if v == "depthwise" else " +global")
                                             for w, p, v in grid.index], fontsize=7)
        ax.set_title(f"{runtime}, batch {batch}", fontsize=9)
    fig.suptitle(f"replaced / original latency of one attention layer (below 1: faster), "
                 f"{table.threads.iloc[0]} threads", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
