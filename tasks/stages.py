"""The pipeline of METHOD.md as stages: what each runs, reads from the configuration and needs."""
from .compress import run_replace, run_score, run_select
from .data import run as run_data, source_listing
from .evaluate import run_benchmark, run_evaluate
from .stage import Stage
from .train import run_baseline, run_recover

STAGES = {s.name: s for s in [
    Stage("data", run_data, ("data",), watch=source_listing),
    Stage("baseline", run_baseline, ("model", "baseline", "device"), needs=("data",)),
    Stage("score", run_score, ("score", "device"), needs=("baseline",)),
    Stage("select", run_select, ("select",), needs=("score",)),
    Stage("replace", run_replace, ("replace",), needs=("baseline", "score", "select")),
    Stage("recover", run_recover, ("recover", "device"), needs=("replace",)),
    Stage("evaluate", run_evaluate, ("evaluate", "device"), needs=("baseline", "replace", "recover")),
    Stage("benchmark", run_benchmark, ("benchmark", "device"), needs=("baseline", "recover")),
]}
