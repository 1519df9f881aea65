"""convheads: replace convolution-like attention heads of timm ViTs with depthwise convolutions.

    scores = score_heads(model, batches, max_images=1000)
    selection = select_heads(scores, count=K, granularity="head")   # or "block"
    replace_heads(model, selection, kernel_size=3, init="gaussian")  # in place
    export_onnx(at_resolution(model, 336), "model.onnx")             # deployment
"""
from .cost import ModelCost, count_params, model_cost
from .ensemble import EnsembleHeadAttention, fold_ensembles
from .errors import ConvHeadsError
from .export import check_onnx, export_onnx
from .fitting import fit_scores
from .folding import FoldedHeadAttention
from .layers import ConvHeadAttention, ReplacedAttention, fold_layers
from .mixers import gaussian_kernel
from .models import (
    at_resolution,
    create_model,
    create_segmentation_model,
    load_checkpoint,
    load_model,
    save_model,
)
from .scoring import HeadScores, score_heads
from .segmentation import SegmentationModel
from .selection import Selection, select_heads
from .surgery import replace_heads, replaced_selection, replacement_config
from .vit import VitInfo, as_vit, vit_info

__all__ = [
    "ConvHeadAttention", "ConvHeadsError", "EnsembleHeadAttention", "FoldedHeadAttention", "HeadScores", "ModelCost",
    "ReplacedAttention", "SegmentationModel", "Selection", "VitInfo", "as_vit", "at_resolution", "check_onnx",
    "count_params", "create_model", "create_segmentation_model", "export_onnx", "fit_scores", "fold_ensembles",
    "fold_layers", "gaussian_kernel", "load_checkpoint", "load_model", "model_cost", "replace_heads",
    "replaced_selection", "replacement_config", "save_model", "score_heads", "select_heads", "vit_info",
]
