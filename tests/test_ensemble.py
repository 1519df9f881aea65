"""The head-ensembled variant computes its formula (see convheads/ensemble.py), folds exactly, counts exactly."""
import pytest
import torch
from helpers import banded_attention, prefixed_vit, tiny_vit, value_and_output_weights

import convheads
from convheads import (
    ConvHeadsError,
    EnsembleHeadAttention,
    Selection,
    count_params,
    fold_ensembles,
    load_model,
    model_cost,
    replace_heads,
    replaced_selection,
    save_model,
    score_heads,
)
from convheads.engine.training import new_parameters


def randomise(layer: EnsembleHeadAttention) -> None:
    """Unequal head weights and prefix scalars, so the test sees every term."""
    with torch.no_grad():
        layer.logits.copy_(torch.randn_like(layer.logits) * 0.02)  # / T = 0.01: clearly unequal weights
        for p in (getattr(layer, "alpha", None), getattr(layer, "beta", None)):
            if p is not None:
                p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_training_form_computes_the_merged_head_formula(prefix):
    model = prefixed_vit(prefix)
    attn = model.blocks[1].attn
    H, d, C = attn.num_heads, attn.head_dim, attn.qkv.in_features
    w_v, b_v, w_o, b_o = value_and_output_weights(attn)
    replace_heads(model, Selection.from_blocks([1], H), variant="ensemble")
    layer = model.blocks[1].attn
    randomise(layer)
    kernel = torch.randn(3, 3)
    layer.mixer.init_kernels(kernel[None])

    h, w = 5, 3
    x = torch.randn(2, prefix + h * w, C)
    p = torch.softmax(layer.logits.detach() / 0.01, dim=0)
    assert p.max() - p.min() > 0.1
    V = sum(p[i] * (x @ w_v[i * d:(i + 1) * d].T + b_v[i * d:(i + 1) * d]) for i in range(H))  # V' [B, N, d]
    W_O = sum(p[i] * w_o[:, i * d:(i + 1) * d] for i in range(H))                               # W_O' [C, d]
    pre, pat = V[:, :prefix], V[:, prefix:]
    if prefix:
        pre = pre + layer.mixer.alpha[:, 0, None] * pat.mean(1, keepdim=True)
        pat = pat + (layer.mixer.beta[:, 0, None] * V[:, :prefix]).sum(1, keepdim=True)
    mixed = torch.cat([pre, banded_attention(kernel, h, w) @ pat], 1)
    torch.testing.assert_close(layer(x), mixed @ W_O.T + b_o, atol=1e-5, rtol=1e-5)


def test_equal_weights_at_init_and_kernels_fitted_to_the_mean_head():
    model = tiny_vit()
    scores = score_heads(model, [torch.randn(4, 3, 32, 32)], progress=False)
    replace_heads(model, Selection.from_blocks([2], 4), variant="ensemble", init="attention", scores=scores)
    layer = model.blocks[2].attn
    torch.testing.assert_close(layer.head_weights(), torch.full((4,), 0.25))
    expected = scores.kernels(3)[2].mean(0)
    torch.testing.assert_close(layer.mixer.conv.weight[:, 0], expected.expand(layer.head_dim, 3, 3))


@pytest.mark.parametrize("prefix", [0, 5])
def test_folded_model_equals_the_training_form(prefix):
    model = tiny_vit(class_token=prefix > 0, reg_tokens=max(0, prefix - 1), global_pool="token" if prefix else "avg")
    replace_heads(model, Selection({0: [1, 2]}))                                     # scattered depthwise
    replace_heads(model, Selection.from_blocks([1, 2], 4), variant="ensemble")
    for b in (1, 2):
        randomise(model.blocks[b].attn)
    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    assert fold_ensembles(model) is model
    layer = model.blocks[1].attn
    assert layer.folded and not hasattr(layer, "logits")
    C, d = 32, 8
    assert layer.in_proj.weight.shape == (d, C) and layer.proj.weight.shape == (C, d)
    assert layer.mixer.conv.weight.shape == (d, 1, 3, 3)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConvHeadsError, match="folded"):
        layer.head_weights()


def test_parameters_and_macs_of_both_forms_are_exact():
    C, H, d, N, P, k = 32, 4, 8, 17, 1, 3      # tiny_vit: 4 x 4 patches + CLS
    model = tiny_vit()
    base = model_cost(model)
    replace_heads(model, Selection.from_blocks([1], H), variant="ensemble")
    train_form = model_cost(model)
    # W_Q, W_K (+ biases) go; one logit per head, a k x k kernel per merged channel and alpha, beta come
    assert base.params - train_form.params == (2 * C * C + 2 * C) - (H + k * k * d + 2 * P)
    fold_ensembles(model)
    folded = model_cost(model)
    # in_proj C -> d, proj d -> C, conv on d channels, alpha, beta
    attn_params = (C * C * 3 + 3 * C) + (C * C + C)
    assert base.params - folded.params == attn_params - ((d * C + d) + (d * C + C) + k * k * d + 2 * P)
    # per token: the two thin projections instead of QKV and W_O; no attention; the conv on the patches
    assert base.macs - folded.macs == N * 4 * C * C + 2 * N * N * C - (2 * N * C * d + k * k * d * (N - P))
    assert train_form.macs == folded.macs and base.attention_macs - folded.attention_macs == 2 * N * N * C
    assert count_params(model) == folded.params


def test_gradients_reach_every_head_and_the_logits():
    model = replace_heads(tiny_vit(), Selection.from_blocks([0], 4), variant="ensemble").train()
    layer = model.blocks[0].attn
    randomise(layer)
    model.forward_features(torch.randn(2, 3, 32, 32)).sum().backward()
    assert layer.logits.grad.abs().min() > 0
    per_head = layer.in_proj.weight.grad.view(4, 8, 32).abs().sum(dim=(1, 2))
    assert (per_head > 0).all()
    new = {id(p) for p in new_parameters(model)}
    assert new == {id(layer.logits), id(layer.mixer.conv.weight), id(layer.mixer.alpha), id(layer.mixer.beta)}
    assert id(layer.in_proj.weight) not in new
    fold_ensembles(model)
    mixing = {id(layer.mixer.conv.weight), id(layer.mixer.alpha), id(layer.mixer.beta)}
    assert {id(p) for p in new_parameters(model)} == mixing


@pytest.mark.parametrize("fold", [False, True])
def test_save_and_load_keep_the_form(tmp_path, fold):
    model = replace_heads(tiny_vit(reg_tokens=2), Selection.from_blocks([0, 2], 4), variant="ensemble")
    replace_heads(model, Selection({1: [3]}))
    randomise(model.blocks[0].attn)
    if fold:
        fold_ensembles(model)
    x = torch.randn(2, 3, 32, 32)
    again = load_model(save_model(model, tmp_path / "m.pt"))
    torch.testing.assert_close(again(x), model(x))
    assert again.blocks[0].attn.folded == fold and isinstance(again.blocks[2].attn, EnsembleHeadAttention)
    assert replaced_selection(again) == replaced_selection(model)
    assert replaced_selection(again).heads[0] == [0, 1, 2, 3]


def test_ensembles_need_whole_blocks_and_leave_the_model_unchanged_otherwise():
    model = tiny_vit()
    params = count_params(model)
    with pytest.raises(ConvHeadsError, match=r"whole blocks .*granularity='block'"):
        replace_heads(model, Selection({0: range(4), 1: [0, 1]}), variant="ensemble")
    scale_norm = tiny_vit(scale_attn_norm=True)
    with pytest.raises(ConvHeadsError, match="scale_norm=True"):
        replace_heads(scale_norm, Selection.from_blocks([0, 1], 4), variant="ensemble")
    for m in (model, scale_norm):
        assert not any(isinstance(x, convheads.ReplacedAttention) for x in m.modules())
    assert count_params(model) == params
