"""The device check: one prepared command for a lent accelerator (and, with --quick, for 2 CPU cores).

    python -m benchmarks.device_check                  # the paper setting on the device at hand (< 8 min, H200)
    python -m benchmarks.device_check --quick          # the same code paths, tiny models, 2 CPU cores (< 3 min)

Four parts, in this order, each with its own time limit so that a slow part cannot eat the rest:

  a. correctness: every replacement variant's layer and the gated DSP block, on the device in fp32,
     bf16 and fp16, train and eval mode, outputs and gradients, against the same layer in float64
     on the CPU (the reference), within the tolerance stated per dtype in TOLERANCE;
  b. speed: ViT-L/14 at 336 with 12 of 24 blocks replaced (random weights) against the original
     (timm's attention through SDPA), for depthwise, depthwise_global, identity and ensemble;
     batch 1 and 64, fp16 and bf16, eager, torch.compile and (CUDA only, batch 1) CUDA graphs;
     models timed interleaved round by round (CUDA events on a GPU), medians with their quartiles;
     then ViT-B/14 at 518 (DINOv2's own resolution);
  c. training: one bf16 training step of the replaced ViT-L/14 at 336, with and without gradient
     checkpointing: images/s and peak memory;
  d. the pipeline: every stage of a tiny configuration on the device. It needs the pipeline's own
     packages (pydantic, scikit-learn, torchmetrics, ...); where they are missing it says which and
     how to carry them, and skips.

Parts a-c import only torch, timm and convheads: nothing on that path imports prefect, mlflow or dvc.
It writes device_check.csv (one row per measurement) and device_check.md (the same as tables,
stamped with commit, date, machine and command) under --out.
"""
import argparse
import copy
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from convheads import ConvHeadAttention, EnsembleHeadAttention, Selection, replace_heads
from convheads.dsp import GatedAttention
from convheads.engine.timing import synchronize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest |device - reference| over the largest |reference|, for outputs and for every gradient.
TOLERANCE = {"fp32": 1e-4, "bf16": 4e-2, "fp16": 5e-3}
LAYER_VARIANTS = ("depthwise", "depthwise_global", "identity", "fixed", "drop", "ensemble", "dsp_gated")
SPEED_VARIANTS = ("depthwise", "depthwise_global", "identity", "ensemble")
PART_LIMIT_S = {"a": 60.0, "b": 300.0, "c": 60.0, "d": 60.0}   # sums to 8 minutes
QUICK_LIMIT_S = {"a": 30.0, "b": 80.0, "c": 20.0, "d": 40.0}
PIPELINE_MODULES = ("pydantic", "yaml", "sklearn", "torchmetrics", "pandas", "PIL", "tqdm")


@dataclass(frozen=True)
class Setting:
    """One speed/training setting: a ViT of the given shape and the blocks replaced in it."""
    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    replaced_blocks: int
    batches: Sequence[int]

    def build(self) -> nn.Module:
        """Random weights, DINOv2's layout (a class token, layer scale), no head."""
        return VisionTransformer(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                                 depth=self.depth, num_heads=self.num_heads, init_values=1e-5, num_classes=0)

    def blocks(self) -> List[int]:
        """Every other block: the replaced ones spread over the depth, as a score-based pick tends to be."""
        step = self.depth // self.replaced_blocks
        return list(range(0, step * self.replaced_blocks, step))


PAPER = (Setting("ViT-L/14@336", 336, 14, 1024, 24, 16, 12, (1, 64)),
         Setting("ViT-B/14@518", 518, 14, 768, 12, 12, 6, (1, 64)))
QUICK = (Setting("tiny@32", 32, 4, 64, 4, 2, 2, (1, 4)),)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


# ---------------------------------------------------------------------------------------------- a. correctness

def _layer(variant: str, attn: Attention, grid: int, prefix: int) -> nn.Module:
    if variant == "ensemble":
        return EnsembleHeadAttention(attn, (grid, grid), prefix)
    if variant == "dsp_gated":
        layer = GatedAttention(attn, (grid, grid), prefix)
        layer.weight = torch.linspace(0.1, 0.9, attn.num_heads)   # between the branches: both must be right
        return layer
    return ConvHeadAttention(attn, [0, 2], (grid, grid), prefix, variant=variant)   # 2 of 4 heads kept


def _max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _run(layer: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Output and the gradients of <output, probe> w.r.t. the input and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    (out.float() * probe).sum().backward()
    found = {"output": out.detach(), "grad input": x.grad}
    found.update({f"grad {n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    return found


def correctness(device: torch.device, deadline: Deadline) -> List[dict]:
    rows = []
    dim, heads, grid, prefix, batch = 128, 4, 8, 1, 2
    for variant in LAYER_VARIANTS:
        torch.manual_seed(0)
        layer = _layer(variant, Attention(dim, heads, qkv_bias=True), grid, prefix)
        for p in getattr(layer, "mixing_parameters", lambda: [])()[1:]:   # prefix scalars: not their init
            nn.init.uniform_(p)
        x = torch.randn(batch, prefix + grid * grid, dim)
        probe = torch.randn(batch, prefix + grid * grid, dim)
        for mode in ("train", "eval"):
            ref_layer = copy.deepcopy(layer).double().train(mode == "train")
            reference = _run(ref_layer, x.double(), probe.double())
            for precision, dtype in DTYPES.items():
                row = {"part": "a", "variant": variant, "mode": mode, "precision": precision,
                       "tolerance": TOLERANCE[precision]}
                if deadline.passed():
                    rows.append({**row, "note": "skipped: the part's time limit passed"})
                    continue
                if device.type == "cpu" and precision == "fp16":
                    rows.append({**row, "note": "skipped: fp16 is for accelerators"})
                    continue
                try:
                    dut = copy.deepcopy(layer).to(device, dtype).train(mode == "train")
                    found = _run(dut, x.to(device, dtype), probe.to(device))
                    errors = {k: _max_rel(found[k], v) for k, v in reference.items() if v is not None}
                    worst = max(errors, key=errors.get)
                    rows.append({**row, "max_rel_err": errors[worst], "worst": worst,
                                 "ok": errors[worst] <= TOLERANCE[precision] and found.keys() == reference.keys()})
                except Exception as e:   # a failure of one case is a result; the others still run
                    rows.append({**row, "ok": False, "note": f"{type(e).__name__}: {e}"[:200]})
    return rows


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failed(row: dict, error: Exception, device: torch.device) -> dict:
    _free(device)   # what the failed case held (an out-of-memory, say) is not the next one's
    return {**row, "ok": False, "note": f"{type(error).__name__}: {error}"[:200]}


# ------------------------------------------------------------------------------------------------- b. speed

def time_interleaved(runners: Dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     deadline: Deadline, max_rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each runner, round by round, every runner once per round (so drift in the
    machine's speed hits them alike); CUDA events on a GPU. Stops at max_rounds or the deadline."""
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for r in range(warmup + max_rounds):
        if r >= warmup + 3 and deadline.passed():
            break
        for name, run in runners.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                run()
                elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(elapsed)
    return times


def _cuda_graph(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The model's forward captured once as a CUDA graph; replaying it re-runs the same kernels on x."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def _models(setting: Setting, device: torch.device, dtype: torch.dtype) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    original = setting.build()
    models = {"original": original}
    for variant in SPEED_VARIANTS:
        selection = Selection.from_blocks(setting.blocks(), setting.num_heads, depth=setting.depth)
        models[variant] = replace_heads(copy.deepcopy(original), selection, variant=variant)
    return {name: m.to(device, dtype).eval() for name, m in models.items()}


def _runtimes(device: torch.device, batch: int) -> List[str]:
    return ["eager", "compile"] + (["cuda_graph"] if device.type == "cuda" and batch == 1 else [])


@torch.inference_mode()
def _time_condition(models: Dict[str, nn.Module], runtime: str, x: torch.Tensor, deadline: Deadline,
                    max_rounds: int) -> Dict[str, List[float]]:
    if runtime == "compile":
        torch._dynamo.reset()
        runners = {n: (lambda c: lambda: c(x))(torch.compile(m)) for n, m in models.items()}
    elif runtime == "cuda_graph":
        runners = {n: _cuda_graph(m, x) for n, m in models.items()}
    else:
        runners = {n: (lambda m: lambda: m(x))(m) for n, m in models.items()}
    return time_interleaved(runners, x.device, warmup=3, deadline=deadline, max_rounds=max_rounds)


def speed(device: torch.device, settings: Sequence[Setting], deadline: Deadline, max_rounds: int) -> List[dict]:
    conditions = [(s, p, b, rt) for s in settings for p in ("fp16", "bf16") for b in s.batches
                  for rt in _runtimes(device, b)]
    if device.type == "cpu":   # CPU: bf16 only (fp16 matmuls on a CPU say nothing about a GPU)
        conditions = [c for c in conditions if c[1] == "bf16"]
    rows, built = [], {}
    for i, (setting, precision, batch, runtime) in enumerate(conditions):
        row = {"part": "b", "setting": setting.name, "precision": precision, "batch": batch, "runtime": runtime}
        if deadline.passed():
            rows.append({**row, "note": "skipped: the part's time limit passed"})
            continue
        try:
            key = (setting.name, precision)
            if key not in built:
                built.clear()   # one setting's models on the device at a time
                _free(device)
                built[key] = _models(setting, device, DTYPES[precision])
            models = built[key]
            x = torch.randn(batch, 3, setting.img_size, setting.img_size, device=device, dtype=DTYPES[precision])
            # an equal share of what is left for each remaining condition
            share = Deadline(deadline.left() / (len(conditions) - i))
            times = _time_condition(models, runtime, x, share, max_rounds)
            base = statistics.median(times["original"])
            for name, t in times.items():
                q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
                rows.append({**row, "variant": name, "median_ms": statistics.median(t) * 1e3, "q1_ms": q1 * 1e3,
                             "q3_ms": q3 * 1e3, "rounds": len(t), "speedup": base / statistics.median(t)})
        except Exception as e:   # one setting's failure is a result; the others still run
            rows.append(_failed(row, e, device))
    return rows


# ---------------------------------------------------------------------------------------------- c. training

def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = nn.functional.mse_loss(model(x).float(), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training(device: torch.device, setting: Setting, batch: int, steps: int, deadline: Deadline) -> List[dict]:
    rows = []
    for checkpointing in (False, True):
        row = {"part": "c", "setting": setting.name, "precision": "bf16", "batch": batch,
               "variant": "depthwise", "runtime": "eager", "grad_checkpointing": checkpointing}
        if deadline.passed():
            rows.append({**row, "note": "skipped: the part's time limit passed"})
            continue
        try:
            torch.manual_seed(0)
            model = setting.build()
            replace_heads(model, Selection.from_blocks(setting.blocks(), setting.num_heads, depth=setting.depth))
            model.set_grad_checkpointing(checkpointing)
            model.to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(batch, 3, setting.img_size, setting.img_size, device=device)
            target = torch.randn(batch, setting.embed_dim, device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            _train_step(model, optimizer, x, target)   # the first step allocates the optimizer's state
            synchronize(device)
            start, done = time.perf_counter(), 0
            while done < steps and not (done and deadline.passed()):
                _train_step(model, optimizer, x, target)
                done += 1
            synchronize(device)
            seconds = (time.perf_counter() - start) / done
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            rows.append({**row, "median_ms": seconds * 1e3, "rounds": done, "images_per_s": batch / seconds,
                         "peak_mem_mb": peak})
            model = optimizer = None   # freed before the next setting's model is built
            _free(device)
        except Exception as e:   # one setting's failure is a result; the others still run
            rows.append(_failed(row, e, device))
    return rows


# ---------------------------------------------------------------------------------------------- d. pipeline

def pipeline(device: torch.device, deadline: Deadline) -> List[dict]:
    missing = [m for m in PIPELINE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return [{"part": "d", "ok": False, "note": (
            f"skipped: the pipeline needs {', '.join(missing)}, missing here. Carry them: on the CPU machine "
            f"`pip download --no-deps -d wheels {' '.join(missing)}`, run with carry=['wheels'] and "
            f"`pip install --no-index --find-links wheels {' '.join(missing)}` first")}]
    from pipeline.config import PipelineConfig, tiny_params  # here, not at the top: parts a-c need none of it
    from pipeline.dag import STAGES
    from pipeline.runner import execute

    rows = []
    with tempfile.TemporaryDirectory() as root:
        cfg = tiny_params(root)
        cfg.update(device=device.type, precision="bf16" if device.type == "cuda" else "fp32")
        config = PipelineConfig.model_validate(cfg)
        for name, stage in STAGES.items():
            if deadline.passed():
                rows.append({"part": "d", "variant": name, "note": "skipped: the part's time limit passed"})
                continue
            start = time.perf_counter()
            try:
                execute(stage, config)
                rows.append({"part": "d", "variant": name, "ok": True, "seconds": time.perf_counter() - start})
            except Exception as e:
                rows.append({"part": "d", "variant": name, "ok": False, "note": f"{type(e).__name__}: {e}"[:200]})
    return rows


# ------------------------------------------------------------------------------------------------ the report

def stamp(argv: Sequence[str], device: torch.device) -> Dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    return {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{what}, {platform.machine()}, torch {torch.__version__}",
            "command": " ".join(["python -m benchmarks.device_check", *argv])}


def _table(frame) -> str:
    """A markdown table, or (without tabulate, as on a bare device machine) the plain text one in a code block."""
    try:
        return frame.to_markdown(index=False, floatfmt=".4g", missingval="")
    except ImportError:
        return "```\n" + frame.to_string(index=False, na_rep="") + "\n```"


def markdown(rows: List[dict], header: Dict[str, str]) -> str:
    import pandas as pd  # for the tables only

    table = pd.DataFrame(rows)
    lines = ["# Device check", "", *[f"- {k}: `{v}`" for k, v in header.items()], ""]
    titles = {"a": "a. Correctness (max relative error against float64 on the CPU)",
              "b": "b. Inference speed (speedup: the original's median over the variant's)",
              "c": "c. One bf16 training step", "d": "d. The pipeline's stages on the device"}
    for part, title in titles.items():
        sub = table[table.part == part].dropna(axis=1, how="all")
        lines += [f"## {title}", ""]
        lines += [_table(sub.drop(columns="part")) if len(sub) else "(not run)", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, short limits: the code paths on a CPU")
    parser.add_argument("--parts", nargs="+", default=list("abcd"), choices=list("abcd"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/device_check"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    limits = QUICK_LIMIT_S if args.quick else PART_LIMIT_S
    settings = QUICK if args.quick else PAPER
    rows: List[dict] = []
    for part in args.parts:
        deadline, start = Deadline(limits[part]), time.perf_counter()
        print(f"part {part} (limit {limits[part]:.0f} s) ...", flush=True)
        try:
            if part == "a":
                rows += correctness(device, deadline)
            elif part == "b":
                rows += speed(device, settings, deadline, max_rounds=10 if args.quick else 50)
            elif part == "c":
                rows += training(device, settings[0], batch=2 if args.quick else 32, steps=2 if args.quick else 5,
                                 deadline=deadline)
            else:
                rows += pipeline(device, deadline)
        except Exception:
            traceback.print_exc()
            rows.append({"part": part, "ok": False, "note": "the part crashed: see the log"})
        print(f"part {part} done in {time.perf_counter() - start:.0f} s", flush=True)
    import pandas as pd

    args.out.mkdir(parents=True, exist_ok=True)
    header = stamp(argv if argv is not None else sys.argv[1:], device)
    pd.DataFrame(rows).assign(**header).to_csv(args.out / "device_check.csv", index=False)
    report = markdown(rows, header)
    (args.out / "device_check.md").write_text(report)
    print(report)
    failed = [r for r in rows if r.get("ok") is False]
    print(f"\n{len(rows)} rows, {len(failed)} failed; written to {args.out}/device_check.csv and .md")
    return 1 if any(r["part"] == "a" for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
