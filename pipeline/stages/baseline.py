"""Stage baseline: fine-tune the ViT (with its segmentation head, for segmentation) on the task,
step 1 of the method."""
from pathlib import Path
from typing import Dict, Optional

from ..config import PipelineConfig
from ..finetune import fine_tune
from ..hashing import file_digest
from ..problems import problem
from ..runner import Stage


def run(cfg: PipelineConfig, out: Path) -> Dict:
    return fine_tune(cfg, "baseline", problem(cfg).build(), out)


def checkpoint_digest(cfg: PipelineConfig) -> Optional[str]:
    """What the stage's fingerprint watches besides the configuration: the contents of
    model.checkpoint, so a checkpoint rewritten in place retrains the baseline."""
    return file_digest(cfg.model.checkpoint) if cfg.model.checkpoint else None


STAGE = Stage("baseline", run, ("task", "model", "segmentation", "baseline", "device", "precision"),
              needs=("data",), watch=checkpoint_digest)
