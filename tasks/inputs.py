"""What several stages read: the dataset's loaders (timm's transforms at the model's input size,
normalised for it) and the models other stages saved."""
from pathlib import Path
from typing import Dict, Optional

from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader

from convheads import ConvHeadsError, distributed, load_model, vit_info
from convheads.data import ManifestDataset, default_num_workers, image_transform, make_loader
from convheads.precision import resolve_device

from .config import PipelineConfig
from .data import MANIFEST, images_root
from .runner import output_dir

MODEL_FILE = "model.pt"


def data_config(cfg: PipelineConfig, model: nn.Module) -> Dict:
    """timm's data config for `model` at its own input size, with the configured overrides.

    The digits fill their frame, so they are not centre-cropped (crop_pct 1.0) unless configured."""
    dc = resolve_data_config({}, model=model)
    dc["input_size"] = (3, *vit_info(model).img_size)
    m = cfg.model
    dc["mean"], dc["std"] = tuple(m.mean or dc["mean"]), tuple(m.std or dc["std"])
    dc["crop_pct"] = m.crop_pct or (1.0 if cfg.data.source == "digits" else dc["crop_pct"])
    return dc


def augmentation(cfg: PipelineConfig, augment: str) -> str:
    """A training stage's augment setting, resolved: auto is light for the digits (a flipped or
    cropped digit can be another digit), timm's train transform for everything else."""
    if augment == "auto":
        return "light" if cfg.data.source == "digits" else "timm"
    return augment


def loader(cfg: PipelineConfig, model: nn.Module, split: str, batch_size: int, train: bool = False,
           augment: str = "none", accumulation: Optional[int] = None) -> DataLoader:
    """A loader over one split, shuffled when `train`, augmented as `augment` says (see TrainConfig).

    accumulation (training): batch_size is the global batch of one update, shared by this process
    with the others (torchrun) and split into `accumulation` steps. In a process group, an
    evaluation loader reads this process's share of the split."""
    transform = image_transform(data_config(cfg, model), augmentation(cfg, augment))
    dataset = ManifestDataset(Path(cfg.paths.data) / MANIFEST, images_root(cfg), split, transform)
    lc = cfg.loader
    workers = default_num_workers() if lc.num_workers is None else lc.num_workers
    return make_loader(dataset, batch_size, train=train, num_workers=workers,
                       pin_memory=resolve_device(cfg.device).startswith("cuda") if lc.pin_memory is None
                       else lc.pin_memory, persistent_workers=lc.persistent_workers,
                       drop_last=accumulation is not None, accumulation=accumulation or 1,
                       rank=distributed.rank(), world=distributed.world_size())


def stage_model(cfg: PipelineConfig, stage: str) -> nn.Module:
    path = output_dir(cfg, stage) / MODEL_FILE
    if not path.is_file():
        raise ConvHeadsError(f"no model from stage {stage!r} at {path}; run the pipeline from the start")
    return load_model(path)
