"""The folded variant computes its formula (see convheads/folding.py), folds exactly (borders and
prefix tokens included), counts exactly, starts from the rank-1 projection of the attention fit."""
import copy

import onnx
import pytest
import torch
from helpers import banded_attention, prefixed_vit, tiny_vit, value_and_output_weights

from convheads import (
    ConvHeadsError,
    FoldedHeadAttention,
    ReplacedAttention,
    Selection,
    check_onnx,
    count_params,
    export_onnx,
    fold_layers,
    load_model,
    model_cost,
    replace_heads,
    save_model,
)
from convheads.engine.training import new_parameters
from convheads.folding import rank_one
from convheads.mixing import IMPLEMENTATIONS


def randomise(layer: FoldedHeadAttention) -> None:
    """An asymmetric kernel, unequal channel scales, prefix scalars and a value bias: every term shows."""
    with torch.no_grad():
        layer.mixer.kernel.normal_()
        layer.in_proj.bias.normal_(0.0, 0.5)
        layer.scale.normal_(1.0, 0.5)
        for p in layer.mixer.scalars().values():
            p.normal_()


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_training_form_computes_the_formula(prefix):
    model = prefixed_vit(prefix)
    attn = model.blocks[1].attn
    C = attn.qkv.in_features
    w_v, b_v, w_o, b_o = value_and_output_weights(attn)
    replace_heads(model, Selection.from_blocks([1], 4), variant="folded")
    layer = model.blocks[1].attn
    randomise(layer)
    b_v = layer.in_proj.bias.detach().clone()
    h, w = 5, 3
    x = torch.randn(2, prefix + h * w, C)
    V = x @ w_v.T + b_v
    pre, pat = V[:, :prefix], V[:, prefix:]
    if prefix:
        alpha, beta = layer.mixer.alpha.detach(), layer.mixer.beta.detach()      # [P, 1]
        pre = pre + alpha[None] * pat.mean(1, keepdim=True)
        pat = pat + (beta[None] * V[:, :prefix]).sum(1, keepdim=True)
    mixed = torch.cat([pre, banded_attention(layer.mixer.kernel.detach(), h, w) @ pat], 1)
    expected = (layer.scale.detach() * mixed) @ w_o.T + b_o
    for how in IMPLEMENTATIONS:
        layer.mixing = how
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_folded_model_equals_its_training_form(prefix):
    model = prefixed_vit(prefix)
    replace_heads(model, Selection({0: [1, 2]}))                                   # scattered depthwise
    replace_heads(model, Selection.from_blocks([1, 2], 4), variant="folded")
    for b in (1, 2):
        randomise(model.blocks[b].attn)
    x = torch.randn(3, 3, 40, 24)
    expected = model(x)
    assert fold_layers(model) is model
    layer = model.blocks[1].attn
    assert layer.folded and not hasattr(layer, "in_proj") and not hasattr(layer, "scale")
    assert layer.bias_at == "input"      # the bias carried by the value shift
    for how in IMPLEMENTATIONS:
        for b in (1, 2):
            model.blocks[b].attn.mixing = how
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def folded_pair(prefix: int, bias_at: str):
    """A model with a folded block (randomised), folded in the form bias_at, and its training form."""
    model = replace_heads(prefixed_vit(prefix), Selection.from_blocks([1], 4), variant="folded")
    randomise(model.blocks[1].attn)
    trained = copy.deepcopy(model)
    model.blocks[1].attn.fold(bias_at=bias_at)
    return model, trained


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_both_bias_forms_equal_the_training_form_in_float32_and_float64(prefix):
    x = torch.randn(2, 3, 40, 24)
    for bias_at in ("input", "output"):
        model, trained = folded_pair(prefix, bias_at)
        layer = model.blocks[1].attn
        assert layer.bias_at == bias_at and hasattr(layer, "value_shift") == (bias_at == "input")
        for how in IMPLEMENTATIONS:
            layer.mixing = how
            torch.testing.assert_close(model(x), trained(x), atol=1e-5, rtol=1e-5)
    # in float64 the layer adds the bias map
    torch.testing.assert_close(model.double()(x.double()), trained.double()(x.double()))


def test_under_autocast_a_large_shift_is_not_used():
    """z = W_V^-1 b_V 1,000 times b_V's size (gain 1,000: fine in float32): in bfloat16 x + z would
    round x away, so under autocast the layer adds the bias map instead."""
    model = replace_heads(prefixed_vit(1), Selection.from_blocks([1], 4), variant="folded")
    layer = model.blocks[1].attn
    randomise(layer)
    C = layer.in_proj.in_features
    u, _, vh = torch.linalg.svd(torch.randn(C, C))
    with torch.no_grad():
        layer.in_proj.weight.copy_(u @ torch.diag(torch.logspace(0, -3, C)) @ vh)
        layer.in_proj.bias.copy_(u[:, -1])                 # along the smallest singular direction
    trained = copy.deepcopy(layer)
    layer.fold()
    assert layer.bias_at == "input" and layer.value_shift.norm() > 500
    x = torch.randn(2, 1 + 5 * 3, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x).float(), trained(x).float(), atol=0.05, rtol=0.05)


def test_a_singular_value_projection_keeps_the_bias_map():
    model = replace_heads(prefixed_vit(1), Selection.from_blocks([1], 4), variant="folded")
    layer = model.blocks[1].attn
    randomise(layer)
    with torch.no_grad():
        layer.in_proj.weight[:, 0] = 0       # W_V z = b_V has no solution where b_V leaves W_V's range
    x = torch.randn(2, 3, 40, 24)
    expected = model(x)
    layer.fold()
    assert layer.bias_at == "output" and not hasattr(layer, "value_shift")
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConvHeadsError, match="bias_at must be one of"):
        replace_heads(prefixed_vit(1), Selection.from_blocks([1], 4), variant="folded").blocks[1].attn.fold("in")


def test_the_exported_input_form_adds_nothing_after_the_projection(tmp_path):
    ops = {}
    for bias_at in ("input", "output"):
        model, _ = folded_pair(1, bias_at)
        path = export_onnx(model, tmp_path / f"{bias_at}.onnx", batch_size=1)
        assert check_onnx(model, path) < 1e-4
        ops[bias_at] = [n.op_type for n in onnx.load(str(path)).graph.node
                        if "/blocks.1/attn/" in n.name and not any(m in n.name for m in ("/mixer/", "/proj/"))]
    # the bias map T_K(1) x value_bias, added to the projected tokens: a pass over them of its own
    assert "Add" in ops["output"] and ops["input"] == []


@pytest.mark.parametrize("prefix", [0, 2])
def test_the_bias_map_is_the_in_grid_tap_sum_at_every_patch(prefix):
    model = replace_heads(prefixed_vit(prefix), Selection.from_blocks([0], 4), variant="folded")
    layer = model.blocks[0].attn
    randomise(layer)
    kernel = layer.mixer.kernel.detach()
    S = banded_attention(kernel, 5, 3).sum(1)           # the taps on the grid: fewer at borders and corners
    assert len(set(S.round(decimals=4).tolist())) > 3
    expected = S
    if prefix:
        expected = torch.cat([1 + layer.mixer.alpha.detach()[:, 0], S * (1 + layer.mixer.beta.detach().sum())])
    torch.testing.assert_close(layer.mixer.of_ones((5, 3))[:, 0], expected)


def test_parameters_and_macs_of_both_forms_are_exact():
    C, N, P, k = 32, 17, 1, 3      # tiny_vit: 4 x 4 patches + CLS
    model = tiny_vit()
    base = model_cost(model)
    replace_heads(model, Selection.from_blocks([1], 4), variant="folded")
    train_form = model_cost(model)
    # W_Q, W_K (+ biases) go; the kernel, alpha, beta and the channel scale come
    assert base.params - train_form.params == (2 * C * C + 2 * C) - (k * k + 2 * P + C)
    assert base.macs - train_form.macs == N * 2 * C * C + 2 * N * N * C - k * k * C * (N - P)
    fold_layers(model)
    folded = model_cost(model)
    # one C x C matrix + bias, the value bias, the kernel, alpha, beta
    attn_params = (C * C * 3 + 3 * C) + (C * C + C)
    assert base.params - folded.params == attn_params - ((C * C + C) + C + k * k + 2 * P)
    # per token: one C x C matmul instead of QKV and W_O; no attention; the shared kernel on the patches
    assert base.macs - folded.macs == N * 3 * C * C + 2 * N * N * C - k * k * C * (N - P)
    identity = replace_heads(tiny_vit(), Selection.from_blocks([1], 4), variant="identity")
    assert folded.macs - model_cost(identity).macs == k * k * C * (N - P)
    assert count_params(model) == folded.params


def test_rank_one_projection_reproduces_kernels_that_are_multiples_of_one():
    K = torch.randn(3, 3).abs()
    s = torch.tensor([0.5, 1.0, 2.0, -0.3])
    kernel, scale = rank_one(s[:, None, None] * K)
    assert scale.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(scale[:, None, None] * kernel, s[:, None, None] * K)
    assert kernel.sum() > 0
    kernel, scale = rank_one(torch.zeros(4, 3, 3))
    assert (kernel == 0).all() and (scale == 1).all()


def test_attention_init_starts_from_the_fit():
    model = prefixed_vit(1)
    replace_heads(model, Selection.from_blocks([0], 4), variant="folded")
    layer = model.blocks[0].attn
    K = torch.tensor([[0.0, 0.1, 0.0], [0.1, 0.4, 0.1], [0.0, 0.1, 0.2]])
    s = torch.tensor([0.5, 1.0, 1.5, 1.0])
    sums = layer._mean_tap_sums(s[:, None, None] * K)                 # [H]: each head's mean in-grid tap sum
    alpha, beta = 0.3 * s[None], 0.2 * s[None] / sums[None]          # heads that agree with one pair
    layer.init_from_fit({"kernel": s[:, None, None] * K, "alpha": alpha, "beta": beta})
    torch.testing.assert_close(layer.scale.detach(), s.repeat_interleave(8))
    torch.testing.assert_close(layer.mixer.kernel.detach(), K)
    torch.testing.assert_close(layer.mixer.alpha.detach(), torch.tensor([[0.3]]))
    # a prefix token reaches head h's patches with a_h beta S_K = beta_h S_h, as fitted
    reach = s * layer.mixer.beta.detach()[0] * layer._mean_tap_sums(K[None])
    torch.testing.assert_close(reach, 0.2 * s)


def test_gradients_reach_the_kernel_scale_and_prefix_scalars():
    model = replace_heads(tiny_vit(), Selection.from_blocks([0], 4), variant="folded").train()
    layer = model.blocks[0].attn
    randomise(layer)
    model.forward_features(torch.randn(2, 3, 32, 32)).sum().backward()
    for p in (layer.mixer.kernel, layer.scale, layer.mixer.alpha, layer.mixer.beta, layer.in_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    new = {id(p) for p in new_parameters(model)}
    assert new == {id(layer.mixer.kernel), id(layer.mixer.alpha), id(layer.mixer.beta), id(layer.scale)}


@pytest.mark.parametrize("fold", [None, "input", "output"])
def test_save_load_and_onnx_keep_the_function(tmp_path, fold):
    model = replace_heads(tiny_vit(reg_tokens=2), Selection.from_blocks([0, 2], 4), variant="folded")
    replace_heads(model, Selection({1: [3]}))
    randomise(model.blocks[0].attn)
    if fold:
        for b in (0, 2):
            model.blocks[b].attn.fold(bias_at=fold)
    x = torch.randn(2, 3, 32, 32)
    again = load_model(save_model(model, tmp_path / "m.pt"))
    torch.testing.assert_close(again(x), model(x))
    assert again.blocks[0].attn.folded == bool(fold) and isinstance(again.blocks[2].attn, FoldedHeadAttention)
    assert again.blocks[0].attn.bias_at == fold
    path = export_onnx(model, tmp_path / "m.onnx", batch_size=2)
    assert model.blocks[0].attn.folded == bool(fold)    # exported folded, the model left as it was
    assert check_onnx(model, path) < 1e-4


def test_folded_needs_whole_blocks_and_leaves_the_model_unchanged_otherwise():
    model = tiny_vit()
    with pytest.raises(ConvHeadsError, match=r"variant='folded' .*whole blocks .*granularity='block'"):
        replace_heads(model, Selection({0: range(4), 1: [0, 1]}), variant="folded")
    scale_norm = tiny_vit(scale_attn_norm=True)
    with pytest.raises(ConvHeadsError, match="scale_norm=True"):
        replace_heads(scale_norm, Selection.from_blocks([0], 4), variant="folded")
    for m in (model, scale_norm):
        assert not any(isinstance(x, ReplacedAttention) for x in m.modules())
