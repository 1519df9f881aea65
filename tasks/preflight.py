"""Checks that need no real work, run before the first stage: a bad configuration fails in
seconds with a message naming the key or file, not an hour into training."""
from pathlib import Path

import torch

from convheads import ConvHeadsError, create_model, vit_info
from convheads.models import check_state_dict, read_state_dict

from .config import PipelineConfig


def check(cfg: PipelineConfig) -> None:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvHeadsError(f"device: {cfg.device!r} but no CUDA GPU is available here; use device=cpu")
    if cfg.data.source == "folder" and not Path(cfg.data.path).is_dir():
        raise ConvHeadsError(f"data.path: {cfg.data.path} is not a folder (expected <path>/<class>/<image>)")
    # The model as configured, built on the meta device (no memory, no init): name and kwargs.
    try:
        model = create_model(cfg.model.name, device="meta", **{**cfg.model.kwargs, "num_classes": 2})
    except ConvHeadsError as e:
        raise ConvHeadsError(f"model: {e}") from None
    info = vit_info(model)
    if cfg.model.checkpoint is not None:
        check_state_dict(model, read_state_dict(cfg.model.checkpoint), f"model.checkpoint {cfg.model.checkpoint}",
                         new_classifier=True)
    s = cfg.select
    if s.blocks is not None:
        bad = [b for b in s.blocks if not 0 <= b < info.depth]
        if bad:
            raise ConvHeadsError(f"select.blocks: {bad} out of range; {cfg.model.name} has blocks 0..{info.depth - 1}")
    elif s.count is not None:
        units = info.depth * info.num_heads if s.granularity == "head" else info.depth
        if s.count > units:
            raise ConvHeadsError(f"select.count: {s.count} is more than the model's {units} "
                                 f"{'heads' if s.granularity == 'head' else 'blocks'}")
