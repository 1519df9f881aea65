"""What the stages do differently per problem (the configuration's `task: classification |
segmentation`): the model they build, the dataset a loader reads, how a model is judged, and the
headline metric the summary leads with and the registry gate compares (`registry.max_drop`). The
stages call `problem(cfg)` and stay the same files for both."""
import functools
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import Dataset

from convheads import as_vit, create_model, create_segmentation_model, vit_info
from convheads.data.images import image_transform
from convheads.data.loaders import ManifestDataset
from convheads.data.segmentation import PairDataset, mask_transform
from convheads.engine.evaluation import evaluate, evaluate_segmentation
from convheads.precision import resolve_device
from convheads.segmentation import IGNORE_INDEX

from .artifacts import MANIFEST, images_root, read_meta
from .config import EMBEDDED, PipelineConfig


def data_config(cfg: PipelineConfig, model: nn.Module) -> Dict:
    """timm's data config for `model` at its own input size, with the configured overrides.

    The embedded images (digits, photo crops) are made at the model's size, so they are not
    centre-cropped (crop_pct 1.0) unless configured."""
    dc = resolve_data_config({}, model=as_vit(model))
    dc["input_size"] = (3, *vit_info(model).img_size)
    m = cfg.model
    dc["mean"], dc["std"] = tuple(m.mean or dc["mean"]), tuple(m.std or dc["std"])
    dc["crop_pct"] = m.crop_pct or (1.0 if cfg.data.source in EMBEDDED else dc["crop_pct"])
    return dc


def augmentation(cfg: PipelineConfig, augment: str) -> str:
    """A training stage's augment setting, resolved: auto is light for the embedded images (a flipped
    or cropped digit can be another digit; a 32 px crop cropped again loses its texture), timm's
    train transform for everything else."""
    if augment == "auto":
        return "light" if cfg.data.source in EMBEDDED else "timm"
    return augment


class Classification:
    quality = (("top1", "top-1"),)   # (metric, label) for the summary; the first is the headline
    metrics: Tuple[str, ...] = ("top1", "top5", "loss")   # what evaluation records per model

    @property
    def headline(self) -> str:
        return self.quality[0][0]

    @property
    def label(self) -> str:
        return self.quality[0][1]

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    @property
    def num_classes(self) -> int:
        return len(read_meta(self.cfg)["classes"])

    def build(self) -> nn.Module:
        m = self.cfg.model
        return create_model(m.name, pretrained=m.pretrained, checkpoint=m.checkpoint,
                            **{**self.cfg.model_kwargs, "num_classes": self.num_classes})

    def dataset(self, model: nn.Module, split: str, augment: str) -> Dataset:
        transform = image_transform(data_config(self.cfg, model), augmentation(self.cfg, augment))
        return ManifestDataset(Path(self.cfg.paths.data) / MANIFEST, images_root(self.cfg), split, transform)

    def evaluate(self, model: Callable, loader: Iterable, progress: bool = True, device: Optional[str] = None,
                 precision: Optional[str] = None, per_image: bool = False) -> Dict:
        """The task's metrics of `model` over `loader`, on `device` at `precision` (None: the configured ones);
        per_image: each image's prediction too (classification), for paired comparisons."""
        return evaluate(model, loader, device or resolve_device(self.cfg.device), progress=progress,
                        precision=precision or self.cfg.precision, per_image=per_image)

    def train_kwargs(self) -> Dict:
        """convheads.engine.training.train's loss and validation settings."""
        return {}


class Segmentation(Classification):
    quality = (("miou", "mIoU"), ("pixel_acc", "pixel accuracy"))
    metrics = ("miou", "pixel_acc", "loss")

    def build(self) -> nn.Module:
        m, s = self.cfg.model, self.cfg.segmentation
        return create_segmentation_model(m.name, self.num_classes, s.feature_blocks, pretrained=m.pretrained,
                                         checkpoint=m.checkpoint, **self.cfg.model_kwargs)

    def dataset(self, model: nn.Module, split: str, augment: str) -> Dataset:
        dc = data_config(self.cfg, model)
        transform = mask_transform(dc["input_size"][1:], dc["mean"], dc["std"], augmentation(self.cfg, augment))
        return PairDataset(Path(self.cfg.paths.data) / MANIFEST, images_root(self.cfg), split, transform,
                           reduce_zero=self.cfg.segmentation.reduce_zero_label)

    def evaluate(self, model: Callable, loader: Iterable, progress: bool = True, device: Optional[str] = None,
                 precision: Optional[str] = None, per_image: bool = False) -> Dict:
        return evaluate_segmentation(model, loader, self.num_classes, device or resolve_device(self.cfg.device),
                                     progress=progress, precision=precision or self.cfg.precision)

    def train_kwargs(self) -> Dict:
        return {"ignore_index": IGNORE_INDEX,
                "validate": functools.partial(evaluate_segmentation, num_classes=self.num_classes)}


PROBLEMS = {"classification": Classification, "segmentation": Segmentation}


def problem(cfg: PipelineConfig) -> Classification:
    return PROBLEMS[cfg.task](cfg)
