"""Numeric precision of a pass: fp32, or bf16 / fp16 autocast (weights stay float32, matmuls and
convolutions run in the low precision, reductions that need it stay float32).

fp16 needs gradient scaling when training (torch.amp.GradScaler, see convheads.training) and a
GPU: CPUs run bf16 autocast only, which is the path the CPU tests take.
"""
import contextlib
from typing import ContextManager

import torch
from torch import nn

from .errors import ConvHeadsError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """`auto`: cuda when a GPU is present, else cpu; anything else as given (cuda:1 too)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_precision(precision: str, device: str) -> None:
    if precision not in PRECISIONS:
        raise ConvHeadsError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "fp16" and torch.device(resolve_device(device)).type != "cuda":
        raise ConvHeadsError("precision fp16 needs a CUDA GPU (CPUs have no fp16 autocast); use precision=bf16 "
                             "on the CPU, or device=cuda")


def autocast(precision: str, device) -> ContextManager:
    """The context a forward pass at `precision` runs in on `device` (a no-op for fp32)."""
    check_precision(precision, str(device))
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's inputs must have: its parameters' (a model cast with .half() takes half
    inputs; patch_embed's convolution refuses float32 ones)."""
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32
