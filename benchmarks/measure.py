"""The measurements of the benchmark suite (benchmarks/suite.py), one function each, returning a
list of flat dicts (one per row): `benchmark_setting` (the variants of one model), `sweep_blocks`
(speedup against the number of replaced blocks), `compare_modes` (eager, channels_last,
torch.compile), `compare_onnx` (onnxruntime and PyTorch, each timed on its own) and `scoring_memory` (the
head-scoring pass). Models have random weights: speed does not depend on their values.
"""
import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from convheads import (
    ConvHeadsError,
    Selection,
    create_model,
    fold_layers,
    model_cost,
    replace_heads,
    score_heads,
    vit_info,
)
from convheads.engine.timing import (
    OnnxTimer,
    PeakMemory,
    check_repeats,
    in_fresh_process,
    latency_stats,
    time_in_runtime,
    time_models,
    time_onnx,
    time_pairs,
)
from convheads.export import check_onnx, export_onnx
from pipeline.config import DIGITS_VIT

VARIANTS = ("original", "depthwise", "depthwise_global", "identity", "ensemble", "folded")
DIGITS = "digits"  # a setting's model name for the pipeline's default ViT (pipeline.config.DIGITS_VIT, 10 classes)


def build_model(model: str, img_size: int, **kwargs) -> nn.Module:
    """timm's `model` at img_size, or the digits default ViT (its img_size is 32)."""
    if model == DIGITS:
        if img_size != DIGITS_VIT["img_size"]:
            raise ConvHeadsError(f"the digits ViT takes {DIGITS_VIT['img_size']} px images; got {img_size}")
        return create_model("vit_tiny_patch16_224", num_classes=10, **DIGITS_VIT, **kwargs)
    return create_model(model, img_size=img_size, **kwargs)

MODES = ("eager", "channels_last", "compile")


@dataclass(frozen=True)
class Setting:
    """A benchmarked model: timm name (or "digits": the pipeline's default ViT, 32 px), square input
    size, and how many blocks have every head replaced (the first `blocks`: all blocks cost the same,
    so which ones does not change the speed)."""
    model: str
    img_size: int
    blocks: int

    @classmethod
    def parse(cls, text: str) -> "Setting":
        """'vit_large_patch14_dinov2:336:12' -> Setting."""
        parts = text.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ConvHeadsError(f"a setting is MODEL:IMG_SIZE:BLOCKS, e.g. vit_large_patch14_dinov2:336:12; "
                                 f"got {text!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]))

    def __str__(self) -> str:
        return f"{self.model}:{self.img_size}:{self.blocks}"

    def check(self) -> None:
        """Raise ConvHeadsError unless the setting can run; builds no weights (meta device)."""
        info = vit_info(build_model(self.model, self.img_size, device="meta"))
        if not 0 <= self.blocks <= info.depth:
            raise ConvHeadsError(f"{self}: {self.model} has {info.depth} blocks; replace 0 to {info.depth} of them")

    def build(self, variants: Sequence[str] = VARIANTS, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> Dict[str, nn.Module]:
        """The original model and its replaced variants, in eval mode, in their deployment form (ensemble and
        folded layers folded)."""
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConvHeadsError(f"unknown variants {unknown}; choose from {VARIANTS}")
        with torch.random.fork_rng(devices=[]):  # the same random weights every time
            torch.manual_seed(0)
            original = build_model(self.model, self.img_size).eval()
        info = vit_info(original)
        selection = Selection.from_blocks(range(self.blocks), info.num_heads, info.depth)
        models = {}
        for v in variants:
            m = original if v == "original" else replace_heads(copy.deepcopy(original), selection, variant=v)
            models[v] = fold_layers(m).to(device, dtype)
        return models

    def row(self, **fields) -> dict:
        return {"model": self.model, "img_size": self.img_size, "blocks": self.blocks, **fields,
                "threads": torch.get_num_threads()}


def _inputs(batch_size: int, img_size: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def benchmark_setting(setting: Setting, batch_sizes: Sequence[int] = (1, 8), variants: Sequence[str] = VARIANTS,
                      repeats: int = 7, warmup: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      progress: bool = False) -> List[dict]:
    """Latency (median, p90), throughput, speedup over the original and analytic cost of each
    variant, timed interleaved per batch size: one row per (batch size, variant)."""
    check_repeats(repeats, warmup)
    models = setting.build(variants, device, dtype)
    costs = {v: model_cost(m) for v, m in models.items()}
    rows = []
    for batch_size in batch_sizes:
        times = time_models(models, _inputs(batch_size, setting.img_size, device, dtype), warmup, repeats, progress)
        stats = {v: latency_stats(t, batch_size) for v, t in times.items()}
        base = stats.get("original")
        for v, s in stats.items():
            rows.append(setting.row(
                depth=len(models[v].blocks), variant=v, **s, device=str(device), dtype=str(dtype).split(".")[-1],
                repeats=repeats, warmup=warmup,
                speedup=base["infer_step_time"] / s["infer_step_time"] if base else None,
                params=costs[v].params, gmacs=costs[v].gmacs,
                macs_ratio=costs["original"].macs / costs[v].macs if "original" in costs else None))
    return rows


def sweep_blocks(model: str, img_size: int, batch_size: int = 1, variant: str = "depthwise", repeats: int = 5,
                 warmup: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = False) -> List[dict]:
    """Speedup against the number of replaced blocks k = 0 .. depth (the first k, all heads), each
    k timed interleaved with the original, beside the analytic MACs ratio original / replaced."""
    check_repeats(repeats, warmup)
    if variant not in VARIANTS[1:]:
        raise ConvHeadsError(f"variant must be one of {VARIANTS[1:]}; got {variant!r}")
    Setting(model, img_size, 0).check()
    original = build_model(model, img_size).eval().to(device, dtype)
    replaced = copy.deepcopy(original)
    info = vit_info(original)
    base = model_cost(original).macs
    x = _inputs(batch_size, img_size, device, dtype)
    rows = []
    for k in tqdm(range(info.depth + 1), desc="sweep", unit="step", disable=not progress):
        if k:  # one more block replaced, in place
            fold_layers(replace_heads(replaced, Selection.from_blocks([k - 1], info.num_heads), variant=variant))
        times = time_models({"original": original, "replaced": replaced}, x, warmup, repeats)
        t0, t1 = statistics.median(times["original"]), statistics.median(times["replaced"])
        rows.append(Setting(model, img_size, k).row(
            depth=info.depth, variant=variant, batch_size=batch_size, original_ms=t0 * 1e3, replaced_ms=t1 * 1e3,
            speedup=t0 / t1, macs_ratio=base / model_cost(replaced).macs, repeats=repeats))
    return rows


def compare_modes(setting: Setting, batch_size: int = 1, variants: Sequence[str] = ("original", "depthwise"),
                  modes: Sequence[str] = MODES, repeats: int = 7, warmup: int = 2, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, progress: bool = False) -> List[dict]:
    """Each variant eager, with channels_last weights and inputs, and torch.compile'd (inductor),
    all timed interleaved; each mode's outputs are checked against eager (max_abs_diff)."""
    check_repeats(repeats, warmup)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConvHeadsError(f"unknown modes {unknown}; choose from {MODES}")
    x = _inputs(batch_size, setting.img_size, device, dtype)
    runners, extra = {}, {}
    with torch.inference_mode():
        for v, model in setting.build(variants, device, dtype).items():
            expected = model(x)
            for mode in modes:
                start = time.perf_counter()
                if mode == "eager":
                    run = model
                elif mode == "channels_last":
                    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
                    run = lambda inp, cl=cl: cl(inp.contiguous(memory_format=torch.channels_last))  # noqa: E731
                else:
                    run = torch.compile(model)
                out = run(x)  # compiles on the first call
                extra[v, mode] = dict(max_abs_diff=float((out - expected).abs().max()),
                                      first_call_s=time.perf_counter() - start)
                runners[v, mode] = run
    times = time_pairs(runners, x, warmup, repeats, progress)
    med = {key: statistics.median(t) for key, t in times.items()}
    return [setting.row(variant=v, mode=mode, **latency_stats(times[v, mode], batch_size),
                        speedup_vs_original=med["original", mode] / t if ("original", mode) in med else None,
                        speedup_vs_eager=med[v, "eager"] / t if (v, "eager") in med else None, **extra[v, mode])
            for (v, mode), t in med.items()]


def compare_onnx(setting: Setting, batch_size: int = 1, variants: Sequence[str] = ("original", "depthwise", "ensemble"),
                 repeats: int = 7, warmup: int = 2, workdir: Optional[Path] = None,
                 progress: bool = False) -> List[dict]:
    """Each variant exported to ONNX and checked numerically against PyTorch in onnxruntime; the
    PyTorch models timed interleaved here, then the ONNX sessions timed interleaved in a process of
    their own (timing.time_onnx: same thread count, spinning off), so neither runtime's idle threads
    slow the other. Each row records the process it was timed in (pid)."""
    check_repeats(repeats, warmup)
    models = setting.build(variants)
    x = _inputs(batch_size, setting.img_size)
    extra, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v, model in models.items():
            path = Path(workdir or tmp) / f"{setting.model}_{setting.img_size}_{setting.blocks}_{v}_b{batch_size}.onnx"
            start = time.perf_counter()
            export_onnx(model, path, batch_size=batch_size)
            extra[v] = dict(export_s=time.perf_counter() - start, onnx_max_abs_diff=check_onnx(model, path),
                            onnx_mb=path.stat().st_size / 2**20)
            paths[v] = path
        times = {(v, "pytorch"): t for v, t in time_models(models, x, warmup, repeats, progress).items()}
        ort_times, ort = time_onnx(paths, x.shape, torch.get_num_threads(), warmup, repeats)
    times.update({(v, "onnxruntime"): t for v, t in ort_times.items()})
    how = {"pytorch": dict(pid=os.getpid()), "onnxruntime": dict(
        pid=ort["pid"], intra_op_threads=ort["threads"], spinning=ort["spinning"])}
    med = {key: statistics.median(t) for key, t in times.items()}
    return [setting.row(variant=v, runtime=r, **latency_stats(times[v, r], batch_size),
                        speedup_vs_original=med["original", r] / med[v, r] if ("original", r) in med else None,
                        speedup_vs_pytorch=med[v, "pytorch"] / med[v, r], **how[r], **extra[v])
            for v in models for r in how]


def compare_int8(setting: Setting, batch_size: int = 1,
                 variants: Sequence[str] = ("original", "depthwise", "identity", "folded"), repeats: int = 7,
                 warmup: int = 2, calibration_images: int = 8) -> List[dict]:
    """Each variant in onnxruntime at float32 and in INT8 (static QDQ, convheads.quantize; dynamic where
    static fails, said in `quantization`), each runtime's models timed interleaved in onnxruntime's own
    process. Calibrated on random images: the weights are random too, and speed depends on neither.

    Within a runtime the rounds are paired (every model ran once per round), so each ratio of medians
    comes with a 95% bootstrap interval over the rounds: the speedup over the original (`speedup_lo`,
    `speedup_hi`) and the latency relative to identity, the cheapest variant that still mixes channels
    (`vs_identity`, `vs_identity_lo`, `vs_identity_hi`)."""
    check_repeats(repeats, warmup)
    models = setting.build(variants)
    x = _inputs(batch_size, setting.img_size)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(batch_size, 3, setting.img_size, setting.img_size, generator=g)
                   for _ in range(max(1, calibration_images // batch_size))]
    times, quantized = {}, {}
    with tempfile.TemporaryDirectory() as tmp, OnnxTimer() as onnx:
        for runtime in ("onnxruntime", "onnxruntime-int8"):
            timed = time_in_runtime(models, runtime, x, Path(tmp), onnx, warmup, repeats, calibration=calibration,
                                    quantized=quantized)
            times.update({(v, runtime): t for v, t in timed.items()})
    med = {key: statistics.median(t) for key, t in times.items()}
    rows = []
    for r in ("onnxruntime", "onnxruntime-int8"):
        for v in models:
            int8 = r == "onnxruntime-int8"
            row = setting.row(variant=v, runtime=r, **latency_stats(times[v, r], batch_size),
                              int8_vs_fp32=med[v, "onnxruntime"] / med[v, r] if int8 else None,
                              quantization=quantized[v].method if int8 else "float32",
                              fallback=(quantized[v].fallback or "") if int8 else "")
            if "original" in models:
                row["speedup_vs_original"] = med["original", r] / med[v, r]
                row["speedup_lo"], row["speedup_hi"] = ratio_interval(times["original", r], times[v, r])
            if "identity" in models:
                row["vs_identity"] = med[v, r] / med["identity", r]
                row["vs_identity_lo"], row["vs_identity_hi"] = ratio_interval(times[v, r], times["identity", r])
            rows.append(row)
    return rows


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], resamples: int = 2000,
                   seed: int = 0) -> Tuple[float, float]:
    """95% bootstrap interval of median(numerator) / median(denominator), two timings of the same
    rounds (round i of each ran back to back): the rounds are resampled together, so what slowed a
    round for both models cancels out of the ratio."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if len(a) != len(b) or len(a) < 2:
        raise ConvHeadsError(f"a paired interval needs two timings of the same >= 2 rounds; got {len(a)} and {len(b)}")
    draws = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(a[draws], axis=1) / np.median(b[draws], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def measure_scoring(model: str, img_size: int, num_images: int, batch_size: int = 8,
                    threads: Optional[int] = None) -> dict:
    """score_heads on `num_images` random images, in this process: images/s and how far the
    process's resident memory rose above its level before the scoring pass (the model is built
    and run once before)."""
    if not isinstance(num_images, int) or num_images < 2:
        raise ConvHeadsError(f"num_images must be an integer >= 2; got {num_images!r}")
    if threads:
        torch.set_num_threads(threads)
    net = build_model(model, img_size).eval()
    g = torch.Generator().manual_seed(0)
    batches = (torch.randn(batch_size, 3, img_size, img_size, generator=g)
               for _ in range(-(-num_images // batch_size)))
    with torch.inference_mode():
        net(torch.randn(batch_size, 3, img_size, img_size, generator=g))  # warm-up: allocator, kernels
    with PeakMemory() as memory:
        start = time.perf_counter()
        score_heads(net, batches, max_images=num_images, progress=False)
        seconds = time.perf_counter() - start
    return {"model": model, "img_size": img_size, "num_images": num_images, "batch_size": batch_size,
            "seconds": seconds, "images_per_s": num_images / seconds, "rss_before_mb": memory.before_mb,
            "peak_rss_mb": memory.peak_mb, "peak_growth_mb": memory.peak_mb - memory.before_mb,
            "threads": torch.get_num_threads()}


def scoring_memory(model: str, img_size: int, counts: Sequence[int] = (100, 1000), batch_size: int = 8,
                   threads: Optional[int] = None) -> List[dict]:
    """measure_scoring for each image count, each in a fresh process, so one run's peak memory
    cannot hide another's: the peak growth must not depend on the count."""
    Setting(model, img_size, 0).check()
    return [in_fresh_process(measure_scoring, model, img_size, n, batch_size, threads or torch.get_num_threads())
            for n in counts]
