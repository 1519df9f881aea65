"""The dataset's loaders as the stages read them: the task's dataset at the model's input size,
normalised for it, shuffled and augmented for training, sharded over torchrun's processes."""
from itertools import islice
from typing import List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from convheads.data.loaders import default_num_workers, make_loader
from convheads.engine import distributed
from convheads.precision import resolve_device

from .config import PipelineConfig
from .problems import problem


def loader(cfg: PipelineConfig, model: nn.Module, split: str, batch_size: int, train: bool = False,
           augment: str = "none", accumulation: Optional[int] = None) -> DataLoader:
    """A loader over one split of the task's dataset, shuffled when `train`, augmented as `augment`
    says (see TrainConfig).

    accumulation (training): batch_size is the global batch of one update, shared by this process
    with the others (torchrun) and split into `accumulation` steps. In a process group, an
    evaluation loader reads this process's share of the split."""
    dataset = problem(cfg).dataset(model, split, augment)
    lc = cfg.loader
    workers = default_num_workers() if lc.num_workers is None else lc.num_workers
    return make_loader(dataset, batch_size, train=train, num_workers=workers,
                       pin_memory=resolve_device(cfg.device).startswith("cuda") if lc.pin_memory is None
                       else lc.pin_memory, persistent_workers=lc.persistent_workers,
                       drop_last=accumulation is not None, accumulation=accumulation or 1,
                       rank=distributed.rank(), world=distributed.world_size())


# Static INT8's activation ranges (min / max) settle on a few batches; onnxruntime's calibrator keeps
# every calibrated tensor of every image until the end, so more images cost memory, not accuracy.
CALIBRATION_IMAGES = 64


def calibration_batches(cfg: PipelineConfig, model: nn.Module, images: Optional[int] = None) -> List[torch.Tensor]:
    """At least `images` training images (never the test split), shuffled with the stage's seed and
    not augmented, in batches: what static INT8 quantization calibrates on. None: enough for one whole
    batch of every benchmark batch size (the INT8 exports have static shapes)."""
    images = images or max(CALIBRATION_IMAGES, *cfg.benchmark.batch_sizes)
    batch_size = min(images, 64)
    batches = loader(cfg, model, "train", batch_size, train=True)
    return [x for x, _ in islice(batches, -(-images // batch_size))]
