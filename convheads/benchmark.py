"""Latency measurement: several models timed interleaved in one process, so that drift in the
machine's speed (thermal, other load) hits every model alike and the ratios stay honest."""
import statistics
import time
from typing import Dict, List, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConvHeadsError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


@torch.inference_mode()
def time_models(models: Mapping[str, nn.Module], inputs: torch.Tensor, warmup: int = 3, repeats: int = 7,
                progress: bool = False) -> Dict[str, List[float]]:
    """Seconds per forward pass of each model on `inputs`, `repeats` rounds, models interleaved."""
    if repeats < 1 or warmup < 0:
        raise ConvHeadsError(f"repeats must be >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    for m in models.values():
        m.eval()
    times: Dict[str, List[float]] = {name: [] for name in models}
    for r in tqdm(range(warmup + repeats), desc="timing", unit="round", disable=not progress, leave=False):
        for name, model in models.items():
            _sync(inputs.device)
            start = time.perf_counter()
            model(inputs)
            _sync(inputs.device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def latency_stats(times: List[float], batch_size: int) -> Dict[str, float]:
    """timm benchmark field names: infer_step_time (ms, median), its p90, infer_samples_per_sec."""
    median = statistics.median(times)
    return {"batch_size": batch_size, "infer_step_time": median * 1e3,
            "infer_step_time_p90": percentile(times, 90) * 1e3, "infer_samples_per_sec": batch_size / median}
