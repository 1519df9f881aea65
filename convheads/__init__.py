"""convheads: replace convolution-like attention heads of timm ViTs with depthwise convolutions.

    scores = score_heads(model, batches, max_images=1000)
    selection = select_heads(scores, count=K, granularity="head")   # or "block"
    replace_heads(model, selection, kernel_size=3, init="gaussian")  # in place
"""
from .cost import ModelCost, count_params, model_cost
from .errors import ConvHeadsError
from .layers import ConvHeadAttention, gaussian_kernel
from .models import create_model, load_checkpoint, load_model, save_model
from .scoring import HeadScores, score_heads
from .selection import Selection, select_heads
from .surgery import replace_heads, replaced_selection, replacement_config
from .vit import VitInfo, vit_info

__all__ = [
    "ConvHeadAttention", "ConvHeadsError", "HeadScores", "ModelCost", "Selection", "VitInfo",
    "count_params", "create_model", "gaussian_kernel", "load_checkpoint", "load_model", "model_cost",
    "replace_heads", "replaced_selection", "replacement_config", "save_model", "score_heads",
    "select_heads", "vit_info",
]
