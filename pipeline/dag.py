"""The pipeline of the method as stages, in order: what each runs, reads from the configuration
and needs from the stages before it. One module per stage holds its `run(cfg, out)`."""
from . import baseline, benchmark, data, evaluate, recover, replace, score, select
from .runner import Stage

STAGES = {s.name: s for s in [
    Stage("data", data.run, ("task", "data", "segmentation"), watch=data.source_listing),
    Stage("baseline", baseline.run, ("task", "model", "segmentation", "baseline", "device", "precision"),
          needs=("data",),
          watch=baseline.checkpoint_digest),
    Stage("score", score.run, ("score", "device", "precision"), needs=("baseline",)),
    Stage("select", select.run, ("select", "replace"), needs=("score",)),  # fit: replace.kernel_size
    Stage("replace", replace.run, ("replace",), needs=("baseline", "score", "select")),
    # dsp (select.method) trains gates on the baseline with the scores' init, to the select stage's budget
    Stage("recover", recover.run, ("segmentation", "recover", "device", "precision"),
          needs=("replace", "baseline", "score", "select")),
    Stage("evaluate", evaluate.run, ("segmentation", "evaluate", "device", "precision"),
          needs=("baseline", "replace", "recover")),
    Stage("benchmark", benchmark.run, ("benchmark", "device", "precision"), needs=("baseline", "recover")),
]}
