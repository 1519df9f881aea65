"""replace_heads on every supported ViT shape; exact parameter and MAC accounting; save/load."""
import pytest
import timm
import torch
from helpers import tiny_vit

import convheads
from convheads import (
    ConvHeadAttention,
    ConvHeadsError,
    Selection,
    count_params,
    load_model,
    model_cost,
    replace_heads,
    replaced_selection,
    save_model,
    score_heads,
    select_heads,
)

MODELS = [  # (timm name, build kwargs, prefix tokens); small images keep the CPU tests quick
    ("vit_tiny_patch16_224", {}, 1),
    ("vit_small_patch16_224", dict(img_size=64), 1),
    ("deit_small_distilled_patch16_224", dict(img_size=64), 2),
    ("vit_small_patch14_dinov2", dict(img_size=70), 1),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=70), 5),
    ("vit_tiny_patch16_224", dict(img_size=(224, 160)), 1),
    ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg", img_size=96), 0),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, num_classes=10), 1),
]


@pytest.mark.parametrize("name, kwargs, prefix", MODELS, ids=lambda v: str(v))
def test_replaced_models_run_train_and_reload(name, kwargs, prefix, tmp_path):
    model = convheads.create_model(name, **kwargs)
    info = convheads.vit_info(model)
    assert info.num_prefix_tokens == prefix
    x = torch.randn(2, 3, *info.img_size)
    scores = score_heads(model, [x], progress=False)
    H = info.num_heads
    replace_heads(model, select_heads(scores, count=H + 1), init="attention", scores=scores)  # scattered
    free = [b for b in range(info.depth) if not isinstance(model.blocks[b].attn, ConvHeadAttention)]
    replace_heads(model, Selection.from_blocks(free[:1], H), variant="identity")            # a whole block
    assert replaced_selection(model).num_replaced == 2 * H + 1
    model.train()
    model.forward_features(x).sum().backward()  # all tokens: with CLS pooling the last patches are unused
    conv = next(m for m in model.modules() if isinstance(m, ConvHeadAttention) and m.variant == "depthwise")
    assert conv.mixer.conv.weight.grad is not None and conv.mixer.conv.weight.grad.abs().sum() > 0
    if prefix:
        assert conv.mixer.alpha.shape == conv.mixer.beta.shape == (prefix, len(conv.conv_heads))
        assert conv.mixer.alpha.grad.abs().sum() > 0 and conv.mixer.beta.grad.abs().sum() > 0
    model.eval()
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(again(x), model(x))
    assert replaced_selection(again) == replaced_selection(model)


def test_parameters_and_macs_drop_by_exactly_the_qk_cost():
    C, H, d, N, k = 192, 3, 64, 197, 3   # vit_tiny_patch16_224: 196 patches + CLS
    model = convheads.create_model("vit_tiny_patch16_224")
    base = model_cost(model)
    replace_heads(model, Selection({4: [1]}))
    one = model_cost(model)
    # one head loses its W_Q, W_K rows (+ biases) and gains a k x k kernel per channel + alpha, beta
    assert base.params - one.params == (2 * d * C + 2 * d) - (k * k * d + 2)
    # per token: Q and K projections; per head: Q K^T and A V; plus the convolution on the patches
    assert base.macs - one.macs == 2 * d * C * N + 2 * N * N * d - k * k * d * (N - 1)
    assert base.attention_macs - one.attention_macs == 2 * N * N * d

    replace_heads(model, Selection({7: range(H)}))
    block = model_cost(model)
    assert one.params - block.params == (2 * C * C + 2 * C) - H * (k * k * d + 2)
    assert one.macs - block.macs == 2 * C * C * N + 2 * N * N * C - k * k * C * (N - 1)

    replace_heads(model, Selection({9: range(H)}), variant="identity")
    ident = model_cost(model)
    # W_Q, W_K gone and W_V, W_O folded into one C x C map
    assert block.params - ident.params == 3 * C * C + 3 * C
    assert block.macs - ident.macs == 3 * C * C * N + 2 * N * N * C


def test_a_dynamic_size_model_follows_the_input_grid():
    model = convheads.create_model("vit_small_patch14_dinov2", img_size=70, dynamic_img_size=True)
    replace_heads(model, Selection({0: [0, 1]}))
    for size in [(70, 70), (56, 84)]:
        out = model.forward_features(torch.randn(1, 3, *size))
        assert out.shape[1] == 1 + size[0] // 14 * size[1] // 14
        assert model.blocks[0].attn.grid_size == (size[0] // 14, size[1] // 14)


def test_bad_calls_leave_the_model_unchanged():
    model = tiny_vit()
    params = count_params(model)
    for kwargs, match in [
        (dict(selection=Selection({5: [0]})), "block 5 but the model has 3 blocks"),
        (dict(selection=Selection({0: [4]})), "head 4 of block 0"),
        (dict(selection=Selection({0: [0]}, depth=12, num_heads=12)), "made for a model with 12 blocks"),
        (dict(selection={0: [0]}), "must be a convheads.Selection"),
        (dict(selection=Selection({0: [0]}), kernel_size=4), "positive odd integer"),
        (dict(selection=Selection({0: [0]}), init="attention"), "needs the scores"),
        (dict(selection=Selection({0: [0]}), init="xavier"), "init must be one of"),
        (dict(selection=Selection({0: [0]}), variant="nop"), "variant must be one of"),
    ]:
        with pytest.raises(ConvHeadsError, match=match):
            replace_heads(model, **kwargs)
    assert count_params(model) == params
    assert not any(isinstance(m, ConvHeadAttention) for m in model.modules())


def test_replacing_a_block_twice_is_refused():
    model = replace_heads(tiny_vit(), Selection({0: [0]}))
    with pytest.raises(ConvHeadsError, match="block 0 already has replaced heads"):
        replace_heads(model, Selection({0: [1]}))


def test_scores_from_another_model_are_refused():
    scores = score_heads(tiny_vit(depth=2), [torch.randn(2, 3, 32, 32)], progress=False)
    with pytest.raises(ConvHeadsError, match="scores are for a model with"):
        replace_heads(tiny_vit(), Selection({0: [0]}), init="attention", scores=scores)


def test_non_vit_models_are_refused():
    resnet = timm.create_model("resnet18")
    for call in (lambda: score_heads(resnet, [torch.randn(2, 3, 32, 32)]),
                 lambda: replace_heads(resnet, Selection({0: [0]})),
                 lambda: model_cost(resnet)):
        with pytest.raises(ConvHeadsError, match="timm VisionTransformer models .* got ResNet"):
            call()
    with pytest.raises(ConvHeadsError, match="got ResNet"):
        convheads.create_model("resnet18")


def test_patch_dropout_is_refused():
    with pytest.raises(ConvHeadsError, match="patch_drop_rate=0"):
        replace_heads(tiny_vit(patch_drop_rate=0.5), Selection({0: [0]}))
