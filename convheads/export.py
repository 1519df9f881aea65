"""ONNX export for deployment: opset 17, static shapes, one resolution.

The exporter is torch's TorchScript-based one (`dynamo=False`): it writes opset 17 as asked. The
torch.export-based exporter (the default since torch 2.9) traces these models just as well, but
writes opset 18 and its down-conversion to 17 fails on the Reduce ops' axes (torch 2.14.1,
onnxscript 0.7.2). Shapes are static, so the tracer's warnings about shape checks being frozen
into the graph are expected and silenced.
"""
import copy
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .errors import ConvHeadsError
from .files import atomic_path
from .layers import ReplacedAttention, fold_layers
from .modes import eval_mode
from .vit import as_vit, vit_info

OPSET = 17


def export_onnx(model: nn.Module, path: Union[str, Path], img_size: Optional[tuple] = None,
                batch_size: int = 1) -> Path:
    """Write `model` as ONNX for float inputs [batch_size, 3, H, W] at the resolution it was built for.

    Layers trained unfolded (ensemble, folded) are exported folded (the model is left as it is). To export at another
    resolution, or a model built with dynamic_img_size=True, export convheads.at_resolution(model, size):
    it freezes the position embedding at that size.
    """
    info = vit_info(model)
    size = info.img_size if img_size is None else (tuple(img_size) if isinstance(img_size, (tuple, list))
                                                  else (img_size, img_size))
    fix = f"export convheads.at_resolution(model, {size}) instead: it freezes the position embedding there"
    if info.dynamic_img_size:
        raise ConvHeadsError(f"the model takes any image size (dynamic_img_size=True); an ONNX export has one; {fix}")
    if size != info.img_size:
        raise ConvHeadsError(f"the model was built for {info.img_size[0]} x {info.img_size[1]} images, not "
                             f"{size[0]} x {size[1]}; {fix}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConvHeadsError(f"batch_size must be a positive integer; got {batch_size!r}")
    if any(isinstance(m, ReplacedAttention) and m.needs_folding for m in model.modules()):
        model = fold_layers(copy.deepcopy(model))
    p = next(model.parameters())
    x = torch.zeros(batch_size, as_vit(model).patch_embed.proj.in_channels, *size, device=p.device, dtype=p.dtype)
    return export_module(model, x, path, input_name="images")


def export_module(module: nn.Module, example: torch.Tensor, path: Union[str, Path], input_name: str = "input") -> Path:
    """Trace `module` (in eval mode) on `example` and write it as ONNX (opset 17, static shapes), atomically.
    Replaced layers export their mixing as one Conv node (see mixing.choose)."""
    with eval_mode(module), atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")  # strided slices
        torch.onnx.export(module, (example,), str(tmp), opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          input_names=[input_name], output_names=["output"])
    return Path(path)


class OnnxModel:
    """An exported model in onnxruntime (CPU) behind a torch-like call: tensor in, tensor out.

    threads: intra-op threads (default: PyTorch's count). spinning: whether idle pool threads
    busy-wait for the next op. Off by default: spinning threads burn the cores that anything else
    in the process (PyTorch, the data loader) needs, and slow it down; turn it on for a process
    that runs nothing but this session.
    """

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None, spinning: bool = False):
        import onnxruntime as ort  # only needed to run exports

        if not Path(path).is_file():
            raise ConvHeadsError(f"ONNX file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3  # errors only: an fp16 graph draws notes about unfoldable constants
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        # What the export takes: float16 for a model exported in half precision, else float32.
        self.dtype = torch.float16 if self.input.type == "tensor(float16)" else torch.float32

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if list(images.shape) != self.input.shape:
            raise ConvHeadsError(f"the ONNX model takes inputs of shape {self.input.shape}; got {list(images.shape)}")
        x = images.detach().cpu().to(self.dtype).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input.name: x})[0])


@torch.no_grad()
def check_onnx(model: nn.Module, path: Union[str, Path], atol: float = 1e-4, rtol: float = 1e-3,
               seed: int = 0) -> float:
    """Run the export in onnxruntime and `model` in PyTorch on one random input; return the largest
    absolute difference, or raise ConvHeadsError if they differ beyond atol + rtol * |PyTorch output|."""
    runner = OnnxModel(path)
    shape = runner.input.shape
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with eval_mode(model):
        p = next(model.parameters())
        expected = model(x.to(p.device, p.dtype)).float().cpu()
    got = runner(x).float()
    if got.shape != expected.shape:
        raise ConvHeadsError(f"{path} outputs shape {tuple(got.shape)}, the model {tuple(expected.shape)}; "
                             f"was it exported from another model?")
    diff = (got - expected).abs()
    worst = float(diff.max())
    if not bool((diff <= atol + rtol * expected.abs()).all()):
        raise ConvHeadsError(f"{path} differs from the PyTorch model by up to {worst:.3g} "
                             f"(atol {atol}, rtol {rtol}); was it exported from another model?")
    return worst
