"""The replacement layer computes what the derivation says: a convolution-like head's A @ V is a depthwise
convolution of V on the patch grid (README, \"The method\")."""
import pytest
import torch
from helpers import banded_attention, prefixed_vit, tiny_vit, value_and_output_weights

import convheads
from convheads import Selection, gaussian_kernel, replace_heads


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_depthwise_heads_equal_attention_with_a_fixed_banded_matrix(prefix, kernel_size):
    model = prefixed_vit(prefix)
    attn = model.blocks[1].attn
    H, d, C = attn.num_heads, attn.head_dim, attn.qkv.in_features
    w_v, b_v, w_o, b_o = value_and_output_weights(attn)
    replace_heads(model, Selection({1: range(H)}), kernel_size=kernel_size)
    layer = model.blocks[1].attn
    kernels = torch.randn(H, kernel_size, kernel_size)
    layer.mixer.init_kernels(kernels)

    h, w = 5, 3
    x = torch.randn(2, prefix + h * w, C)
    V = x @ w_v.T + b_v                                   # [B, N, H*d]
    heads = []
    for i in range(H):
        Vi = V[..., i * d:(i + 1) * d]
        pre, pat = Vi[:, :prefix], Vi[:, prefix:]
        if prefix:
            pre_out = pre + layer.mixer.alpha[:, i, None] * pat.mean(1, keepdim=True)
            pat = pat + (layer.mixer.beta[:, i, None] * pre).sum(1, keepdim=True)
        out = banded_attention(kernels[i], h, w) @ pat     # the attention formula A_i V_i
        heads.append(torch.cat([pre_out, out], 1) if prefix else out)
    expected = torch.cat(heads, -1) @ w_o.T + b_o
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gaussian_kernel_is_normalised_and_symmetric():
    k = gaussian_kernel(5)
    assert k.shape == (5, 5)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    assert k[2, 2] == k.max()
    # sigma = 1: neighbours weigh exp(-1/2) of the centre
    assert (k[2, 3] / k[2, 2]).item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), rel=1e-6)


def test_kept_heads_compute_what_they_computed_before():
    model = tiny_vit(depth=2, num_heads=4)
    x = torch.randn(3, 3, 32, 32)
    replaced = [0, 2]
    d = model.blocks[0].attn.head_dim
    with torch.no_grad():  # zero the replaced heads' outputs on both sides
        for h in replaced:
            model.blocks[0].attn.proj.weight[:, h * d:(h + 1) * d] = 0
    expected = model(x)
    replace_heads(model, Selection({0: replaced}))
    assert model.blocks[0].attn.kept_heads == (1, 3)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_identity_block_folds_into_one_linear_map():
    model = tiny_vit(depth=2)
    attn = model.blocks[0].attn
    C = attn.qkv.in_features
    x = torch.randn(2, 17, C)
    expected = (x @ attn.qkv.weight[2 * C:].T + attn.qkv.bias[2 * C:]) @ attn.proj.weight.T + attn.proj.bias
    replace_heads(model, Selection.from_blocks([0], num_heads=4), variant="identity")
    layer = model.blocks[0].attn
    assert isinstance(layer.proj, torch.nn.Identity) and layer.in_proj.weight.shape == (C, C)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_identity_heads_in_a_mixed_block_pass_values_through():
    model = tiny_vit(depth=1)
    attn = model.blocks[0].attn
    C, d = attn.qkv.in_features, attn.head_dim
    x = torch.randn(2, 17, C)
    v1 = x @ attn.qkv.weight[2 * C + d:2 * C + 2 * d].T + attn.qkv.bias[2 * C + d:2 * C + 2 * d]
    expected = v1 @ attn.proj.weight[:, d:2 * d].T + attn.proj.bias  # head 1 alone: W_O V_1
    replace_heads(model, Selection({0: [1]}), variant="identity")
    layer = model.blocks[0].attn
    with torch.no_grad():  # inside the layer the kept heads 0, 2, 3 come first: silence them
        layer.proj.weight[:, :3 * d] = 0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_masks_are_refused_with_a_clear_error():
    model = replace_heads(tiny_vit(), Selection({0: [0]}))
    with pytest.raises(convheads.ConvHeadsError, match="masks"):
        model.blocks[0].attn(torch.randn(1, 17, 32), attn_mask=torch.ones(17, 17, dtype=torch.bool))


def test_wrong_token_count_names_the_grid():
    model = replace_heads(tiny_vit(), Selection({0: [0]}))
    with pytest.raises(convheads.ConvHeadsError, match="4 x 4 patch grid"):
        model.blocks[0].attn(torch.randn(1, 10, 32))
