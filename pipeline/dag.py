"""The pipeline's stages in order; each declares in its own module what it reads from the
configuration and which stages' outputs it needs (its STAGE)."""
from .stages import baseline, benchmark, data, evaluate, pretrain, recover, replace, score, select

# The compression pipeline (flows.compress, dvc repro's last stages).
STAGES = {s.name: s for s in (data.STAGE, baseline.STAGE, score.STAGE, select.STAGE, replace.STAGE,
                              recover.STAGE, evaluate.STAGE, benchmark.STAGE)}
# Every stage `python -m pipeline run` knows: pretraining (flows.pretrain) makes a checkpoint for the pipeline.
ALL_STAGES = {**STAGES, pretrain.STAGE.name: pretrain.STAGE}
