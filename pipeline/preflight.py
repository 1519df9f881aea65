"""Checks that need no real work, run before the first stage: a bad configuration fails in
seconds with a message naming the key or file, not an hour into training."""
import contextlib
from pathlib import Path

import torch

from convheads import ConvHeadsError, SegmentationModel, Selection, create_model, vit_info
from convheads.data.segmentation import scan_pairs
from convheads.models import check_pretrained
from convheads.precision import check_precision, resolve_device
from convheads.selection import check_count

from .config import PipelineConfig
from .launch import check as check_launch
from .sources import source


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
    segmentation = cfg.task == "segmentation"
    if cfg.data.source == "folder" and not Path(cfg.data.path).is_dir():
        raise ConvHeadsError(f"data.path: {cfg.data.path} is not a folder (expected " + (
            "<path>/images/training/ and <path>/annotations/training/)" if segmentation else "<path>/<class>/<image>)"))
    if cfg.data.source == "csv" and not Path(cfg.data.path).is_file():
        raise ConvHeadsError(f"data.path: {cfg.data.path} is not a file (expected a CSV: path,label[,split])")
    if segmentation and cfg.data.source == "folder":
        with _named("data.path"):  # images and masks paired up: a directory listing (no image is read)
            scan_pairs(Path(cfg.data.path))
    elif cfg.data.source in ("folder", "csv"):
        with _named("data.path"):  # the layout, class list and CSV columns: seconds (no image is read)
            source(cfg.data)
    # The model as configured, built on the meta device (no memory, no init): name, kwargs, and
    # the checkpoint's fit; pretrained weights must be downloadable or in the local cache.
    m = cfg.model
    with _named("model.checkpoint" if m.checkpoint else "model"):
        if m.pretrained and m.checkpoint is None:
            check_pretrained(m.name)
        kwargs = {**cfg.model_kwargs, "num_classes": 2}
        # segmentation: at the model's own size first, so that a size its patches do not divide is
        # named as segmentation.image_size
        model = create_model(m.name, checkpoint=m.checkpoint, device="meta",
                             **{k: v for k, v in kwargs.items() if k != "img_size" or not segmentation})
    if segmentation:
        _check_segmentation(cfg, model)
        with _named("model.checkpoint" if m.checkpoint else "model"):
            model = create_model(m.name, checkpoint=m.checkpoint, device="meta", **kwargs)
    info = vit_info(model)
    s = cfg.select
    if s.blocks is not None:
        with _named("select.blocks"):
            Selection.from_blocks(s.blocks, info.num_heads, info.depth).check(info.depth, info.num_heads)
    elif s.count is not None:
        with _named("select.count"):
            check_count(s.count, info.depth, info.num_heads, s.granularity)


def _check_segmentation(cfg: PipelineConfig, backbone) -> None:
    """The backbone's patch grid fits segmentation.image_size, and feature_blocks are its blocks."""
    s, info = cfg.segmentation, vit_info(backbone)
    size = cfg.model_kwargs.get("img_size", s.image_size)
    if size not in (s.image_size, (s.image_size, s.image_size), [s.image_size, s.image_size]):
        raise ConvHeadsError(f"segmentation.image_size: {s.image_size}, but model.kwargs builds the model for {size}; "
                             f"drop img_size from model.kwargs or make the two equal")
    with _named("segmentation.image_size"):
        info.patch_grid(s.image_size, s.image_size)
    with _named("segmentation.feature_blocks"):
        SegmentationModel(backbone, 2, s.feature_blocks)


@contextlib.contextmanager
def _named(key: str):
    """Prefix a convheads error with the configuration key it came from."""
    try:
        yield
    except ConvHeadsError as e:
        raise ConvHeadsError(f"{key}: {e}") from None
