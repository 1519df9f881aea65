"""Stage replace: replace the selected heads of the baseline with depthwise-convolution heads."""
from pathlib import Path
from typing import Dict

from convheads import model_cost, replace_heads, save_model, vit_info

from ..artifacts import MODEL_FILE, load_scores, load_selection, stage_model
from ..config import PipelineConfig
from ..runner import Stage


def run(cfg: PipelineConfig, out: Path) -> Dict:
    model = stage_model(cfg, "baseline")
    before = model_cost(model)
    r = cfg.replace
    replace_heads(model, load_selection(cfg), kernel_size=r.kernel_size, init=r.init, variant=r.variant,
                  scores=load_scores(cfg) if r.init == "attention" else None)
    save_model(model, out / MODEL_FILE)
    after = model_cost(model)
    return {"params_before": before.params, "params_after": after.params,
            "gmacs_before": before.gmacs, "gmacs_after": after.gmacs, "depth": vit_info(model).depth}


STAGE = Stage("replace", run, ("replace",), needs=("baseline", "score", "select"))
