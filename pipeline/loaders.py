"""What several stages read: the dataset's loaders (the task's dataset, at the model's input size,
normalised for it) and the models other stages saved."""
from typing import Optional

from torch import nn
from torch.utils.data import DataLoader

from convheads import ConvHeadsError, distributed, load_model
from convheads.data import default_num_workers, make_loader
from convheads.precision import resolve_device

from .config import PipelineConfig
from .objective import objective
from .runner import output_dir

MODEL_FILE = "model.pt"


def loader(cfg: PipelineConfig, model: nn.Module, split: str, batch_size: int, train: bool = False,
           augment: str = "none", accumulation: Optional[int] = None) -> DataLoader:
    """A loader over one split of the task's dataset, shuffled when `train`, augmented as `augment`
    says (see TrainConfig).

    accumulation (training): batch_size is the global batch of one update, shared by this process
    with the others (torchrun) and split into `accumulation` steps. In a process group, an
    evaluation loader reads this process's share of the split."""
    dataset = objective(cfg).dataset(model, split, augment)
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
