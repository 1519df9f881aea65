"""Stage 5: replace the selected heads of the baseline with depthwise-convolution heads."""
from pathlib import Path
from typing import Dict

from convheads import model_cost, replace_heads, save_model, vit_info

from .config import PipelineConfig
from .inputs import MODEL_FILE, stage_model
from .score import load_scores
from .select import load_selection


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
