"""Checks that need no real work, run before the first stage: a bad configuration fails in
seconds with a message naming the key or file, not an hour into training."""
import contextlib
from pathlib import Path

import torch

from convheads import ConvHeadsError, Selection, create_model, vit_info
from convheads.models import check_pretrained
from convheads.precision import check_precision, resolve_device
from convheads.selection import check_count

from .config import PipelineConfig
from .data import source
from .launch import check as check_launch


def check_devices(cfg: PipelineConfig) -> None:
    """The device, precision and processes asked for, against this machine (instant: every stage
    command checks them)."""
    if resolve_device(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConvHeadsError(f"device: {cfg.device!r} but no CUDA GPU is available here; use device=cpu (or auto)")
    with _named("precision"):
        check_precision(cfg.precision, cfg.device)
    check_launch(cfg, torch.cuda.device_count())


def check(cfg: PipelineConfig) -> None:
    check_devices(cfg)
    if cfg.data.source == "folder" and not Path(cfg.data.path).is_dir():
        raise ConvHeadsError(f"data.path: {cfg.data.path} is not a folder (expected <path>/<class>/<image>)")
    if cfg.data.source == "csv" and not Path(cfg.data.path).is_file():
        raise ConvHeadsError(f"data.path: {cfg.data.path} is not a file (expected a CSV: path,label[,split])")
    if cfg.data.source in ("folder", "csv"):
        with _named("data.path"):  # the layout, class list and CSV columns: seconds (no image is read)
            source(cfg.data)
    # The model as configured, built on the meta device (no memory, no init): name, kwargs, and
    # the checkpoint's fit; pretrained weights must be downloadable or in the local cache.
    m = cfg.model
    with _named("model.checkpoint" if m.checkpoint else "model"):
        if m.pretrained and m.checkpoint is None:
            check_pretrained(m.name)
        model = create_model(m.name, checkpoint=m.checkpoint, device="meta", **{**m.build_kwargs, "num_classes": 2})
    info = vit_info(model)
    s = cfg.select
    if s.blocks is not None:
        with _named("select.blocks"):
            Selection.from_blocks(s.blocks, info.num_heads, info.depth).check(info.depth, info.num_heads)
    elif s.count is not None:
        with _named("select.count"):
            check_count(s.count, info.depth, info.num_heads, s.granularity)


@contextlib.contextmanager
def _named(key: str):
    """Prefix a convheads error with the configuration key it came from."""
    try:
        yield
    except ConvHeadsError as e:
        raise ConvHeadsError(f"{key}: {e}") from None
