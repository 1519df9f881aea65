"""Stage 6: fine-tune the replaced model to recover accuracy (step 3 of the method)."""
from pathlib import Path
from typing import Dict

from .baseline import fine_tune
from .config import PipelineConfig
from .inputs import stage_model


def run(cfg: PipelineConfig, out: Path) -> Dict:
    model = stage_model(cfg, "replace")
    return fine_tune(cfg, "recover", model, out, trainable=cfg.recover.trainable, fold=True)
