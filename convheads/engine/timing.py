"""Timers: several models timed interleaved in one process, so that drift in the machine's speed
(thermal, other load) hits every model alike and the ratios stay honest; ONNX sessions timed the
same way in a process of their own; and a peak-memory sampler.

Runtimes are never timed interleaved with each other: onnxruntime's and PyTorch's thread pools
each keep their threads busy-waiting for a while after a call, and on a machine with as many
cores as threads those waits steal the other runtime's cores (measured on 2 cores: PyTorch eager
121 ms instead of 75 ms next to onnxruntime sessions). `time_onnx` runs the sessions in a fresh
process, after PyTorch's timing, with spinning off and PyTorch's thread count.
"""
import concurrent.futures
import multiprocessing
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConvHeadsError
from ..export import OnnxModel, export_onnx
from ..precision import autocast
from ..quantize import Quantized, export_int8

# Where a model can be timed: the ONNX export in onnxruntime (CPU, as deployed), the same in INT8
# (convheads.quantize: static, calibrated), PyTorch eager, torch.compile.
INT8_RUNTIME = "onnxruntime-int8"
RUNTIMES = ("onnxruntime", INT8_RUNTIME, "eager", "compile")
ONNX_RUNTIMES = ("onnxruntime", INT8_RUNTIME)  # CPU only


def synchronize(device: torch.device) -> None:
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
            synchronize(inputs.device)
            start = time.perf_counter()
            with autocast(precision, inputs.device):
                model(inputs)
            synchronize(inputs.device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def time_pairs(runners: Mapping[Tuple[str, str], Callable], inputs: torch.Tensor, warmup: int, repeats: int,
                progress: bool) -> Dict[Tuple[str, str], List[float]]:
    """time_models for runners keyed by (variant, how it runs), interleaved, keyed the same way."""
    times = time_models({f"{v}/{how}": r for (v, how), r in runners.items()}, inputs, warmup, repeats, progress)
    return {key: times[f"{key[0]}/{key[1]}"] for key in runners}


def in_fresh_process(fn: Callable, *args):
    """fn(*args) in a newly spawned process (nothing of this one's threads or memory); its result."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def rounds_for(seconds_per_round: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many timed rounds fit in budget_s, clamped to [min_rounds, max_rounds]."""
    return max(min_rounds, min(max_rounds, int(budget_s / max(seconds_per_round, 1e-9))))


def time_within(models: Mapping[str, Callable], inputs: torch.Tensor, warmup: int, budget_s: float,
                min_rounds: int = 3, max_rounds: int = 200) -> Dict[str, List[float]]:
    """time_models with as many rounds as fit in about budget_s (the warm-up rounds say how long one takes)."""
    check_repeats(min_rounds, max(warmup, 1))
    warm = time_models(models, inputs, 0, max(warmup, 1))
    per_round = sum(min(t) for t in warm.values())
    return time_models(models, inputs, 0, rounds_for(per_round, budget_s, min_rounds, max_rounds))


def _time_sessions(paths: Mapping[str, str], shape: Sequence[int], threads: int, warmup: int, repeats: int,
                   budget_s: float) -> Tuple[Dict[str, List[float]], dict]:
    torch.set_num_threads(threads)  # no torch op runs while the sessions are timed; keep the pool small anyway
    sessions = {name: OnnxModel(path, threads=threads) for name, path in paths.items()}
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    times = (time_within(sessions, x, warmup, budget_s, min_rounds=repeats) if budget_s
             else time_models(sessions, x, warmup, repeats))
    options = next(iter(sessions.values())).session.get_session_options()
    return times, {"pid": os.getpid(), "threads": options.intra_op_num_threads,
                   "spinning": options.get_session_config_entry("session.intra_op.allow_spinning")}


class OnnxTimer:
    """A process of its own in which ONNX sessions are timed (see the module doc); one process for
    many timings. Use as a context manager."""

    def __enter__(self) -> "OnnxTimer":
        self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown()

    def time(self, paths: Mapping[str, Union[str, Path]], shape: Sequence[int], threads: int, warmup: int = 3,
             repeats: int = 7, budget_s: float = 0.0) -> Tuple[Dict[str, List[float]], dict]:
        """Seconds per run of each exported model (onnxruntime, CPU) on a random input of `shape`,
        sessions interleaved, with `threads` intra-op threads and spinning off (repeats rounds, or
        as many as fit in budget_s but at least repeats); and how they ran ({"pid", "threads", "spinning"})."""
        check_repeats(repeats, warmup)
        return self._pool.submit(_time_sessions, {k: str(v) for k, v in paths.items()}, list(shape), threads,
                                 warmup, repeats, budget_s).result()


def time_onnx(paths: Mapping[str, Union[str, Path]], shape: Sequence[int], threads: int, warmup: int = 3,
              repeats: int = 7) -> Tuple[Dict[str, List[float]], dict]:
    """OnnxTimer.time in a process started for it."""
    with OnnxTimer() as timer:
        return timer.time(paths, shape, threads, warmup, repeats)


def time_in_runtime(models: Dict[str, nn.Module], runtime: str, x: torch.Tensor, workdir: Path, onnx: OnnxTimer,
                    warmup: int = 3, repeats: int = 7, precision: str = "fp32",
                    calibration: Optional[Iterable[torch.Tensor]] = None,
                    quantized: Optional[Dict[str, Quantized]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each model as `runtime` (RUNTIMES) runs it on `x`, the models interleaved.
    onnxruntime: each model exported at x's batch size (static shapes) into `workdir` and timed in
    `onnx`'s process, with PyTorch's thread count; onnxruntime-int8: the same, each export quantized
    (convheads.quantize.export_int8) on the `calibration` image batches, and each model's Quantized
    (how it was quantized) put into `quantized` if given; compile: torch.compile'd; eager: as they are."""
    if runtime not in RUNTIMES:
        raise ConvHeadsError(f"runtime must be one of {RUNTIMES}; got {runtime!r}")
    if runtime == INT8_RUNTIME:
        if calibration is None:
            raise ConvHeadsError("onnxruntime-int8 calibrates the INT8 models on images: pass calibration=<a few "
                                 "batches of training images>")
        calibration = list(calibration)  # read once per model
        done = {name: export_int8(m, Path(workdir) / f"{name}_b{len(x)}_int8.onnx", calibration, len(x))
                for name, m in models.items()}
        if quantized is not None:
            quantized.update(done)
        return onnx.time({name: q.path for name, q in done.items()}, x.shape, torch.get_num_threads(), warmup,
                         repeats)[0]
    if runtime == "onnxruntime":
        paths = {name: export_onnx(m, Path(workdir) / f"{name}_b{len(x)}.onnx", batch_size=len(x))
                 for name, m in models.items()}
        return onnx.time(paths, x.shape, torch.get_num_threads(), warmup, repeats)[0]
    run_with = {name: torch.compile(m) for name, m in models.items()} if runtime == "compile" else models
    return time_models(run_with, x, warmup=warmup, repeats=repeats, progress=True, precision=precision)


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
        import psutil  # here: only the sampler needs it, and the device check imports this module without it

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
