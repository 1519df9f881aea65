"""ONNX export at a fixed resolution round-trips numerically through onnxruntime."""
import onnx
import pytest
import timm
import torch
from helpers import replaced_tiny

import convheads
from convheads import ConvHeadsError, at_resolution, check_onnx, export_onnx, vit_info
from convheads.export import OnnxModel


def test_a_replaced_model_round_trips_through_onnxruntime(tmp_path):
    model = replaced_tiny()
    path = export_onnx(model, tmp_path / "m.onnx", batch_size=2)
    assert onnx.load(path).opset_import[0].version == 17
    assert not model.blocks[3].attn.folded  # exported folded, but the model is left as it was
    assert check_onnx(model, path) < 1e-4
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(OnnxModel(path)(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConvHeadsError, match=r"inputs of shape \[2, 3, 32, 32\]"):
        OnnxModel(path)(torch.randn(1, 3, 32, 32))


def test_a_mismatched_export_is_caught(tmp_path):
    path = export_onnx(replaced_tiny(), tmp_path / "m.onnx")
    with pytest.raises(ConvHeadsError, match="differs from the PyTorch model"):
        check_onnx(replaced_tiny(), path)  # same shape, other random weights
    with pytest.raises(ConvHeadsError, match="ONNX file not found"):
        check_onnx(replaced_tiny(), tmp_path / "missing.onnx")


def test_other_resolutions_need_a_model_built_for_them(tmp_path):
    model = replaced_tiny()
    with pytest.raises(ConvHeadsError,
                       match=r"built for 32 x 32 images, not 48 x 48.*at_resolution\(model, \(48, 48\)\)"):
        export_onnx(model, tmp_path / "m.onnx", img_size=48)
    with pytest.raises(ConvHeadsError, match="dynamic_img_size=True"):
        export_onnx(replaced_tiny(dynamic_img_size=True), tmp_path / "m.onnx")
    with pytest.raises(ConvHeadsError, match="batch_size must be a positive integer"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(ConvHeadsError, match="not divisible by the patch size"):
        at_resolution(model, 44)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_at_resolution_freezes_the_position_embedding_of_a_dynamic_model(tmp_path):
    model = replaced_tiny(dynamic_img_size=True)
    x = torch.randn(2, 3, 48, 40)
    expected = model(x)                      # timm resamples the position embedding on the fly
    frozen = at_resolution(model, (48, 40))
    info = vit_info(frozen)
    assert not info.dynamic_img_size and info.grid_size == (6, 5) and frozen.pos_embed.shape[1] == 3 + 30
    assert all(b.attn.grid_size == (6, 5) for b in frozen.blocks if isinstance(b.attn, convheads.ReplacedAttention))
    torch.testing.assert_close(frozen(x), expected, atol=1e-5, rtol=1e-5)
    path = export_onnx(frozen, tmp_path / "m.onnx", batch_size=2)
    assert check_onnx(frozen, path) < 1e-4


def test_at_resolution_resamples_a_fixed_size_model_and_keeps_its_replacement():
    model = replaced_tiny()
    bigger = at_resolution(model, 48)
    assert vit_info(bigger).img_size == (48, 48) and bigger.pos_embed.shape[1] == 3 + 36
    assert convheads.replacement_config(bigger) == convheads.replacement_config(model)
    torch.testing.assert_close(bigger.blocks[0].attn.mixer.conv.weight, model.blocks[0].attn.mixer.conv.weight)
    same = at_resolution(model, 32)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(same(x), model(x))
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)  # made by timm, not by us
    assert vit_info(at_resolution(plain, 48)).img_size == (48, 48)


def test_a_half_precision_export_is_fed_and_checked_in_half_precision(tmp_path):
    model = replaced_tiny().half()  # its patch_embed takes float16 inputs only
    path = export_onnx(model, tmp_path / "half.onnx")
    assert OnnxModel(path).dtype == torch.float16
    assert check_onnx(model, path, atol=1e-2, rtol=1e-2) < 1e-2
