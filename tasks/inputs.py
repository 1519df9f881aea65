"""What several stages read: the dataset's loaders (sized and normalised for the model) and
the models other stages saved."""
from pathlib import Path
from typing import Tuple

from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader

from convheads import ConvHeadsError, load_model, vit_info
from convheads.data import make_loader

from .config import PipelineConfig
from .data import read_meta
from .runner import output_dir

MODEL_FILE = "model.pt"


def normalisation(cfg: PipelineConfig, model: nn.Module) -> Tuple[tuple, tuple]:
    """The configured mean/std, else the model's own (timm's data config for it)."""
    data_cfg = resolve_data_config({}, model=model)
    return tuple(cfg.model.mean or data_cfg["mean"]), tuple(cfg.model.std or data_cfg["std"])


def loader(cfg: PipelineConfig, model: nn.Module, split: str, batch_size: int, train: bool = False,
           augment: bool = True) -> DataLoader:
    info = vit_info(model)
    if info.img_size[0] != info.img_size[1]:
        raise ConvHeadsError(f"the pipeline feeds square images; the model takes {info.img_size}")
    mean, std = normalisation(cfg, model)
    return make_loader(Path(cfg.paths.data), split, info.img_size[0], batch_size, mean, std, train=train,
                       augment=augment, classes=read_meta(cfg)["classes"])


def stage_model(cfg: PipelineConfig, stage: str) -> nn.Module:
    path = output_dir(cfg, stage) / MODEL_FILE
    if not path.is_file():
        raise ConvHeadsError(f"no model from stage {stage!r} at {path}; run the pipeline from the start")
    return load_model(path)
