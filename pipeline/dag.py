"""The pipeline's stages in order; each declares in its own module what it reads from the
configuration and which stages' outputs it needs (its STAGE)."""
from .stages import baseline, benchmark, data, evaluate, recover, replace, score, select

STAGES = {s.name: s for s in (data.STAGE, baseline.STAGE, score.STAGE, select.STAGE, replace.STAGE,
                              recover.STAGE, evaluate.STAGE, benchmark.STAGE)}
