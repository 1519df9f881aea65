"""INT8 for CPU deployment: onnxruntime's quantization of an ONNX export (convheads.export).

static   QDQ format: weights int8 per output channel, activations uint8 with ranges calibrated
         (min / max) on images the caller gives (training images: never the test split). The
         deployed graph is fixed-point from end to end where onnxruntime has int8 kernels.
dynamic  weights int8 alone; the activations' ranges are computed on every call. Needs no
         images, and works where static does not (an op the calibration session cannot run).

Only the matrix products and convolutions (MatMul, Gemm, Conv) are quantized: they hold nearly all
of a ViT's arithmetic, and a quantized LayerNorm, Softmax or GELU would cost accuracy without
saving time. The token mixing of replaced heads (the nodes under a `mixer` module: the depthwise
convolution, the patch mean) stays float32 too: a few memory-bound passes over [N, C] with
little arithmetic for int8 to save, where Quantize and Dequantize would add passes and rounding.
The graph goes through onnxruntime's pre-processing first (its optimiser and ONNX shape
inference; its symbolic shape inference fails on the exporter's Reshape of shapes, and static
shapes do not need it).
"""
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from .errors import ConvHeadsError
from .export import export_onnx
from .files import atomic_path

METHODS = ("static", "dynamic")
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
FLOAT_SCOPE = "/mixer/"  # ONNX node names carry the module path: these nodes are a replaced layer's mixing


@dataclass(frozen=True)
class Quantized:
    path: Path
    method: str                         # "static" or "dynamic": what the file holds
    fallback: Optional[str] = None      # why static was asked for and dynamic used


def quantize_onnx(model: Union[str, Path], out: Union[str, Path], calibration: Optional[Iterable[torch.Tensor]] = None,
                  method: str = "static") -> Quantized:
    """Write the INT8 form of the float32 ONNX file `model` to `out` (atomically) and say how it was made.

    calibration: image batches [b, 3, H, W] (any b: they are regrouped into the export's batch size,
    the last partial group dropped) for method "static". Where static quantization fails, dynamic is
    used and `fallback` says why. A graph that cannot be quantized, or whose quantized form
    onnxruntime cannot run, raises ConvHeadsError naming the op."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

    if method not in METHODS:
        raise ConvHeadsError(f"quantization method must be one of {METHODS}; got {method!r}")
    if not Path(model).is_file():
        raise ConvHeadsError(f"ONNX file not found: {model}")
    graph = onnx.load(str(model), load_external_data=False).graph
    input_type = graph.input[0].type.tensor_type
    if input_type.elem_type != onnx.TensorProto.FLOAT:
        raise ConvHeadsError(f"{model} takes {onnx.TensorProto.DataType.Name(input_type.elem_type)} inputs; INT8 "
                             f"quantization starts from a float32 export (export the model in float32)")
    shape = [d.dim_value for d in input_type.shape.dim]
    if method == "static" and calibration is None:
        raise ConvHeadsError("static quantization calibrates on images: pass calibration=<batches of training "
                             "images>, or method='dynamic'")
    fallback = None
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out) as target:
        source = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(model), str(source), skip_symbolic_shape=True)
        except Exception:  # an optimisation only: quantize the export as it is
            shutil.copyfile(model, source)
        excluded = [n.name for n in onnx.load(str(source), load_external_data=False).graph.node
                    if FLOAT_SCOPE in n.name and n.op_type in QUANTIZED_OPS]
        if method == "static":
            try:
                quantize_static(str(source), str(target), _Reader(calibration, graph.input[0].name, shape),
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
                                nodes_to_exclude=excluded)
            except Exception as e:
                fallback = f"static quantization failed: {_describe(e, graph)}"
                method = "dynamic"
        if method == "dynamic":
            try:
                quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded)
            except Exception as e:
                raise ConvHeadsError(f"{model} cannot be quantized: {_describe(e, graph)}"
                                     + (f" ({fallback})" if fallback else "")) from None
        _check_runs(target, model, graph)
    return Quantized(Path(out), method, fallback)


def export_int8(model: nn.Module, out: Union[str, Path], calibration: Iterable[torch.Tensor],
                batch_size: int = 1) -> Quantized:
    """`model` as deployed in INT8: exported in float32 for [batch_size, 3, H, W] (export_onnx: static
    shapes) and quantized statically, calibrated on `calibration` (quantize_onnx: dynamic where static fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(model, Path(tmp) / "float32.onnx", batch_size=batch_size)
        return quantize_onnx(exported, out, calibration)


class _Reader:
    """onnxruntime's CalibrationDataReader over image batches, regrouped into the export's batch size."""

    def __init__(self, batches: Iterable[torch.Tensor], name: str, shape):
        self.name, self.shape, self.batches, self.pending = name, shape, iter(batches), []

    def get_next(self):
        size = self.shape[0]
        while sum(len(b) for b in self.pending) < size:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.pending.append(torch.as_tensor(batch).detach().cpu().float())
        images = torch.cat(self.pending)
        self.pending = [images[size:]] if len(images) > size else []
        x = images[:size]
        if list(x.shape) != self.shape:
            raise ConvHeadsError(f"calibration images of shape {list(x.shape[1:])}; the export takes "
                                 f"{self.shape[1:]}")
        return {self.name: np.ascontiguousarray(x.numpy())}

    def __iter__(self):  # the calibrator's protocol besides get_next
        return iter(self.get_next, None)


def _describe(error: Exception, graph) -> str:
    """The failing node of `graph` named by onnxruntime's message: 'op <type> (node <name>)', and the message."""
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    nodes = {n.name: n.op_type for n in graph.node}
    named = re.search(r"node with name '([^']*)'", message)
    if named and named.group(1) in nodes:
        return f"op {nodes[named.group(1)]} (node {named.group(1)}): {message}"
    for node in graph.node:  # the message names an op type the graph has ("domain:Op(version)" and the like)
        if re.search(rf"\b{re.escape(node.op_type)}\b", message) and node.op_type not in ("Identity",):
            return f"op {node.op_type} (node {node.name or '<unnamed>'}): {message}"
    return message


def _check_runs(path: Path, model, graph) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConvHeadsError(f"the INT8 form of {model} does not run in onnxruntime: {_describe(e, graph)}; "
                             f"export a graph of standard ONNX ops (convheads.export_onnx)") from None
