"""INT8 quantization of ONNX exports (convheads/quantize.py): static QDQ calibrated on images, the
dynamic fallback, and clear errors."""
import onnx
import pytest
import torch
from helpers import replaced_tiny, tiny_vit
from onnx import TensorProto, helper

from convheads import ConvHeadsError, Selection, export_onnx, replace_heads
from convheads.export import OnnxModel
from convheads.quantize import quantize_onnx


def images(n, batch=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n)]


@pytest.mark.parametrize("variant", ["original", "depthwise", "folded"])
def test_static_int8_is_qdq_and_close_to_float(tmp_path, variant):
    model = tiny_vit(depth=4)
    if variant != "original":
        replace_heads(model, Selection.from_blocks([0, 1], 4), variant=variant)
    path = export_onnx(model, tmp_path / "m.onnx", batch_size=2)
    result = quantize_onnx(path, tmp_path / "q.onnx", images(3))        # 9 images regrouped in pairs
    assert result.method == "static" and result.fallback is None
    graph = onnx.load(result.path).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    int8 = [t for t in graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) >= 4 * 2 + 1                     # the weights of every block's matmuls, and the patch embedding
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    reads_int8 = {n.name: any(made_by.get(i) == "DequantizeLinear" for i in n.input)
                  for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    mixing = [name for name in reads_int8 if "/mixer/" in name]
    assert len(mixing) == (0 if variant == "original" else 2 * 2)   # per replaced block: convolution, patch mean
    assert not any(reads_int8[name] for name in mixing)             # the token mixing stays float32
    assert sum(reads_int8.values()) >= 4 * 2 + 1
    x = torch.randn(2, 3, 32, 32)
    expected, got = model(x), OnnxModel(result.path)(x)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()     # random weights: a loose bound


def test_dynamic_needs_no_images_and_static_asks_for_them(tmp_path):
    path = export_onnx(replaced_tiny(), tmp_path / "m.onnx")
    result = quantize_onnx(path, tmp_path / "q.onnx", method="dynamic")
    assert result.method == "dynamic"
    assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(result.path).graph.node}
    with pytest.raises(ConvHeadsError, match="calibrates on images"):
        quantize_onnx(path, tmp_path / "q2.onnx")
    with pytest.raises(ConvHeadsError, match="method must be one of"):
        quantize_onnx(path, tmp_path / "q2.onnx", method="int4")
    with pytest.raises(ConvHeadsError, match=r"float32 export"):
        quantize_onnx(export_onnx(tiny_vit().half(), tmp_path / "h.onnx"), tmp_path / "q2.onnx", images(1))
    assert not (tmp_path / "q2.onnx").exists()


def test_static_falls_back_to_dynamic_and_says_why(tmp_path):
    path = export_onnx(tiny_vit(), tmp_path / "m.onnx")
    wrong = [torch.randn(1, 3, 16, 16)]               # calibration fails: images of another size
    result = quantize_onnx(path, tmp_path / "q.onnx", wrong)
    assert result.method == "dynamic" and "static quantization failed" in result.fallback
    assert "[3, 16, 16]" in result.fallback


def test_a_graph_with_an_op_onnxruntime_cannot_run_names_the_op(tmp_path):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)
    nodes = [helper.make_node("MatMul", ["images", "w"], ["h"], name="proj"),
             helper.make_node("Mystery", ["h"], ["output"], name="mystery_0", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "custom.onnx")
    with pytest.raises(ConvHeadsError, match=r"op Mystery \(node mystery_0\)"):
        quantize_onnx(tmp_path / "custom.onnx", tmp_path / "q.onnx", [torch.randn(1, 4)])
    assert not (tmp_path / "q.onnx").exists()
