"""Timers: several models timed interleaved in one process, so that drift in the machine's speed
(thermal, other load) hits every model alike and the ratios stay honest; and a peak-memory sampler."""
import statistics
import threading
import time
from typing import Callable, Dict, List, Mapping, Tuple

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from convheads import ConvHeadsError
from convheads.precision import autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def check_repeats(repeats: int, warmup: int) -> None:
    if not isinstance(repeats, int) or not isinstance(warmup, int) or repeats < 1 or warmup < 0:
        raise ConvHeadsError(f"repeats must be >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")


@torch.inference_mode()
def time_models(models: Mapping[str, Callable], inputs: torch.Tensor, warmup: int = 3, repeats: int = 7,
                progress: bool = False, precision: str = "fp32") -> Dict[str, List[float]]:
    """Seconds per forward pass of each model (a module or any callable) on `inputs`, `repeats`
    rounds, models interleaved; under autocast for precision bf16 / fp16."""
    check_repeats(repeats, warmup)
    for m in models.values():
        if isinstance(m, nn.Module):
            m.eval()
    times: Dict[str, List[float]] = {name: [] for name in models}
    for r in tqdm(range(warmup + repeats), desc="timing", unit="round", disable=not progress, leave=False):
        for name, model in models.items():
            _sync(inputs.device)
            start = time.perf_counter()
            with autocast(precision, inputs.device):
                model(inputs)
            _sync(inputs.device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def time_pairs(runners: Mapping[Tuple[str, str], Callable], inputs: torch.Tensor, warmup: int, repeats: int,
                progress: bool) -> Dict[Tuple[str, str], List[float]]:
    """time_models for runners keyed by (variant, how it runs), interleaved, keyed the same way."""
    times = time_models({f"{v}/{how}": r for (v, how), r in runners.items()}, inputs, warmup, repeats, progress)
    return {key: times[f"{key[0]}/{key[1]}"] for key in runners}


def latency_stats(times: List[float], batch_size: int) -> Dict[str, float]:
    """timm benchmark field names: infer_step_time (ms, median), its p90, infer_samples_per_sec."""
    median = statistics.median(times)
    return {"batch_size": batch_size, "infer_step_time": median * 1e3,
            "infer_step_time_p90": percentile(times, 90) * 1e3, "infer_samples_per_sec": batch_size / median}



class PeakMemory:
    """The largest resident memory (MiB) of this process while the block runs, sampled by a thread
    (torch ops release the GIL, so it keeps sampling while they run)."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak_mb, self._done = every_s, 0.0, threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self.before_mb = self._process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
