"""Checks that need no real work, run before the first stage: a bad configuration fails in
seconds with a message naming the key or file, not an hour into training."""
import contextlib
from pathlib import Path

import torch

from convheads import ConvHeadsError, Selection, create_model, vit_info
from convheads.models import check_state_dict, read_state_dict
from convheads.selection import check_count

from .config import PipelineConfig


def check(cfg: PipelineConfig) -> None:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvHeadsError(f"device: {cfg.device!r} but no CUDA GPU is available here; use device=cpu")
    if cfg.data.source == "folder" and not Path(cfg.data.path).is_dir():
        raise ConvHeadsError(f"data.path: {cfg.data.path} is not a folder (expected <path>/<class>/<image>)")
    # The model as configured, built on the meta device (no memory, no init): name and kwargs.
    with _named("model"):
        model = create_model(cfg.model.name, device="meta", **{**cfg.model.kwargs, "num_classes": 2})
    info = vit_info(model)
    if cfg.model.checkpoint is not None:
        check_state_dict(model, read_state_dict(cfg.model.checkpoint), f"model.checkpoint {cfg.model.checkpoint}",
                         new_classifier=True)
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
