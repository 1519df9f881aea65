"""Fine-tuning as the baseline and recover stages run it: the configured settings of the stage, the
task's loaders, resumable in the stage's work folder, under torchrun when launched so; writes
model.pt and history.csv."""
from pathlib import Path
from typing import Callable, Dict, Optional

import pandas as pd
from torch import nn

from convheads import count_params, fold_layers, save_model
from convheads.engine import distributed
from convheads.engine.training import train
from convheads.precision import resolve_device

from .artifacts import HEADLINE, HISTORY, MODEL_FILE
from .config import PipelineConfig
from .loaders import loader
from .problems import problem

RESUME = "resume.pt"  # in the stage's work folder, which survives an interruption


def fine_tune(cfg: PipelineConfig, stage: str, model: nn.Module, out: Path, fold: bool = False,
              prepare: Optional[Callable] = None, on_epoch: Optional[Callable] = None,
              finish: Optional[Callable] = None) -> Dict:
    """Train `model` with the settings of `stage` (baseline or recover); write model.pt and history.csv
    into `out`. prepare(train_loader) runs before training, on_epoch(row) after each epoch (rank 0),
    finish(model) after training, before the model is saved (rank 0); its dict joins the summary.
    fold: save the layers trained unfolded (ensemble, folded) in their deployment form."""
    settings, task = getattr(cfg, stage), problem(cfg)
    train_loader = loader(cfg, model, "train", settings.batch_size, train=True, augment=settings.augment,
                          accumulation=settings.accumulation)
    if prepare is not None:
        prepare(train_loader)
    history = train(model, train_loader, settings, loader(cfg, model, "val", cfg.evaluate.batch_size),
                    device=distributed.local_device(resolve_device(cfg.device)), precision=cfg.precision,
                    seed=cfg.seed, checkpoint=out / RESUME, on_epoch=on_epoch, **task.train_kwargs())
    if not distributed.is_main():  # rank 0 writes the outputs
        return {}
    finished = finish(model) if finish is not None else {}
    if fold:
        fold_layers(model)
    save_model(model.cpu(), out / MODEL_FILE)
    table = pd.DataFrame(history)
    if f"val_{task.headline}" in table:
        table[HEADLINE] = table[f"val_{task.headline}"]
    table.to_csv(out / HISTORY, index=False)
    (out / RESUME).unlink(missing_ok=True)
    last = history[-1] if history else {}
    return {"epochs": len(history), "params": count_params(model),
            **{k: v for k, v in last.items() if k.startswith("val_")}, **finished}
