"""Stage 2: fine-tune the ViT (with its segmentation head, for segmentation) on the task (step 1 of
the method). `fine_tune` also serves recovery."""
from pathlib import Path
from typing import Callable, Dict, Optional

import pandas as pd

from convheads import count_params, distributed, fold_ensembles, save_model
from convheads.precision import resolve_device
from convheads.training import train

from .config import PipelineConfig
from .inputs import MODEL_FILE, loader
from .objective import objective
from .runner import file_digest

HISTORY = "history.csv"
# history.csv's copy of the task's headline metric on the validation split (val_top1 or val_miou):
# the one column dvc.yaml's plots can name for either task (its templating cannot pick by task)
HEADLINE = "val_headline"


def fine_tune(cfg: PipelineConfig, stage: str, model, out: Path, trainable: str = "all",
              fold: bool = False, prepare: Optional[Callable] = None, on_epoch: Optional[Callable] = None,
              finish: Optional[Callable] = None) -> Dict:
    """Train `model` with the settings of `stage` (baseline or recover); write model.pt and history.csv
    into `out`. prepare(train_loader) runs before training, on_epoch(row) after each epoch (rank 0),
    finish(model) after training, before the model is saved (rank 0); its dict joins the summary."""
    tcfg = cfg.training(stage)
    resume = out / "resume.pt"  # the stage's work folder survives an interruption: resume there
    train_loader = loader(cfg, model, "train", tcfg.batch_size, train=True, augment=tcfg.augment,
                          accumulation=tcfg.accumulation)
    if prepare is not None:
        prepare(train_loader)
    history = train(model, train_loader, loader(cfg, model, "val", cfg.evaluate.batch_size), epochs=tcfg.epochs,
                    lr=tcfg.lr, on_epoch=on_epoch,
                    weight_decay=tcfg.weight_decay, warmup_epochs=tcfg.warmup_epochs,
                    label_smoothing=tcfg.label_smoothing, trainable=trainable,
                    device=distributed.local_device(resolve_device(cfg.device)), checkpoint=resume, seed=cfg.seed,
                    precision=cfg.precision, accumulation=tcfg.accumulation, clip_grad=tcfg.clip_grad,
                    grad_checkpointing=tcfg.grad_checkpointing, ema_decay=tcfg.ema_decay,
                    layer_decay=tcfg.layer_decay, **objective(cfg).train_kwargs())
    if not distributed.is_main():  # rank 0 writes the outputs
        return {}
    finished = finish(model) if finish is not None else {}
    if fold:  # the compressed model is the inference form: ensembles folded into thin linear maps
        fold_ensembles(model)
    save_model(model.cpu(), out / MODEL_FILE)
    table = pd.DataFrame(history)
    if f"val_{objective(cfg).headline}" in table:
        table[HEADLINE] = table[f"val_{objective(cfg).headline}"]
    table.to_csv(out / HISTORY, index=False)
    resume.unlink(missing_ok=True)
    last = history[-1] if history else {}
    return {"epochs": len(history), "params": count_params(model),
            **{k: v for k, v in last.items() if k.startswith("val_")}, **finished}


def run(cfg: PipelineConfig, out: Path) -> Dict:
    return fine_tune(cfg, "baseline", objective(cfg).build(), out)


def checkpoint_digest(cfg: PipelineConfig):
    """What the stage's fingerprint watches besides the configuration: the contents of
    model.checkpoint, so a checkpoint rewritten in place retrains the baseline."""
    return file_digest(cfg.model.checkpoint) if cfg.model.checkpoint else None
