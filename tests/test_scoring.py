"""Head scoring: streaming statistics equal the batch statistics of explicit attention maps."""
import copy

import pytest
import torch
from helpers import head_scores, tiny_vit

import convheads
from convheads import score_heads, select_heads
from convheads.scoring import HeadScores, _offset_means


def reference_maps(model, images):
    """Attention probabilities from timm's own unfused path: the input of attn_drop, [B, D, H, N, N]."""
    model = copy.deepcopy(model)
    maps = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0]))
    with torch.no_grad():
        model(images)
    return torch.stack(maps, 1).double()


def test_sigma_equals_the_sum_of_per_element_standard_deviations():
    model = tiny_vit()
    images = torch.randn(8, 3, 32, 32)
    maps = reference_maps(model, images)
    scores = score_heads(model, [images[:3], images[3:4], images[4:]], progress=False, tokens="all")
    expected = maps.std(dim=0, unbiased=True).sum(dim=(-2, -1))  # Bessel's correction
    torch.testing.assert_close(scores.sigma_h, expected, atol=1e-7, rtol=1e-6)  # float32 maps
    patches = score_heads(model, [images], progress=False)  # the default: patch queries and keys (token 0 is CLS)
    torch.testing.assert_close(patches.sigma_h, maps.std(dim=0)[..., 1:, 1:].sum(dim=(-2, -1)), atol=1e-7, rtol=1e-6)
    assert (patches.sigma_h < scores.sigma_h).all() and patches.sigma_tokens == "patches"
    assert scores.sigma_h.dtype == torch.float64 and scores.sigma_h.shape == (3, 4)
    torch.testing.assert_close(scores.sigma_b, expected.mean(dim=1))
    assert scores.num_images == 8
    mean = maps.mean(dim=0)  # [D, H, N, N]; token 0 is the CLS token
    torch.testing.assert_close(scores.patch_to_prefix, mean[..., 1:, :1].mean(dim=-2), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(scores.prefix_to_patches, mean[..., :1, 1:].sum(dim=-1), atol=1e-7, rtol=1e-6)


def test_scores_do_not_depend_on_how_images_are_batched():
    model = tiny_vit()
    images = torch.randn(9, 3, 32, 32)
    a = score_heads(model, [images], progress=False)
    b = score_heads(model, [(images[i:i + 2], torch.zeros(2)) for i in range(0, 9, 2)], progress=False)
    torch.testing.assert_close(a.sigma_h, b.sigma_h, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(a.offset_attention, b.offset_attention, atol=1e-9, rtol=1e-6)


def test_an_input_independent_head_scores_zero_and_is_selected_first():
    model = tiny_vit()
    attn = model.blocks[2].attn
    C, d = attn.qkv.in_features, attn.head_dim
    with torch.no_grad():  # W_Q = W_K = 0 for head 3 of block 2: uniform attention whatever the input
        for part in (0, 1):
            attn.qkv.weight[part * C + 3 * d: part * C + 4 * d] = 0
            attn.qkv.bias[part * C + 3 * d: part * C + 4 * d] = 0
    scores = score_heads(model, [torch.randn(6, 3, 32, 32)], progress=False)
    assert scores.sigma_h[2, 3].item() == pytest.approx(0.0, abs=1e-12)
    assert (scores.sigma_h.flatten() > 1e-3).sum() == 11
    assert select_heads(scores, count=1).heads == {2: [3]}


def test_scoring_leaves_the_model_as_it_was(capsys):
    model = tiny_vit().train()
    fused = [b.attn.fused_attn for b in model.blocks]
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    before = model(x)
    model.train()
    score_heads(model, [x], progress=True)
    assert model.training
    assert [b.attn.fused_attn for b in model.blocks] == fused
    assert all(not b.attn._forward_pre_hooks for b in model.blocks)
    torch.testing.assert_close(model.eval()(x), before)
    assert "scoring heads" in capsys.readouterr().err  # the progress bar


def test_max_images_stops_reading_batches():
    model = tiny_vit()
    pulled = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield torch.randn(4, 3, 32, 32)

    scores = score_heads(model, batches(), max_images=10, progress=False)
    assert scores.num_images == 10
    assert pulled == [0, 1, 2]


def test_offset_means_average_over_queries_whose_neighbour_exists():
    h, w = 3, 4
    N = h * w
    maps = torch.zeros(1, N + 1, N + 1, dtype=torch.float64)  # one prefix token
    for y in range(h):
        for x in range(w):
            if x + 1 < w:
                maps[0, 1 + y * w + x, 1 + y * w + x + 1] = 0.6  # to the right-hand neighbour
            if y + 1 < h and x == 0:
                maps[0, 1 + y * w + x, 1 + (y + 1) * w + x] = 0.3  # down, from the first column only
    off = _offset_means(maps, (h, w), num_prefix=1)
    assert off.shape == (1, 2 * h - 1, 2 * w - 1)
    assert off[0, h - 1, w].item() == pytest.approx(0.6)  # (dy, dx) = (0, +1): every valid query
    # (+1, 0): valid queries are the 8 patches of rows 0-1; two of them (column 0) attend with 0.3
    assert off[0, h, w - 1].item() == pytest.approx(0.3 * 2 / 8)
    assert off.sum().item() == pytest.approx(0.6 + 0.3 * 2 / 8)


def test_kernels_are_centred_crops_zero_padded_beyond_the_grid():
    off = torch.arange(5 * 3, dtype=torch.float64).reshape(1, 1, 5, 3)  # grid (3, 2)
    scores = head_scores(torch.zeros(1, 1), grid_size=(3, 2), offset_attention=off)
    k3 = scores.kernels(3)
    assert k3.shape == (1, 1, 3, 3)
    torch.testing.assert_close(k3[0, 0], off[0, 0, 1:4, 0:3].float())
    k5 = scores.kernels(5)
    torch.testing.assert_close(k5[0, 0, 2, 2], off[0, 0, 2, 1].float())  # offset (0, 0) at the centre
    assert (k5[0, 0, :, 0] == 0).all() and (k5[0, 0, :, 4] == 0).all()


def test_scores_round_trip_through_a_dict():
    scores = score_heads(tiny_vit(), [torch.randn(3, 3, 32, 32)], progress=False)
    again = HeadScores.from_dict(scores.to_dict())
    for field in ("sigma_h", "offset_attention", "patch_to_prefix", "prefix_to_patches"):
        torch.testing.assert_close(getattr(again, field), getattr(scores, field))
    assert again.grid_size == scores.grid_size == (4, 4)


def test_attention_init_fits_kernels_beta_and_alpha_from_the_scores():
    model = tiny_vit(reg_tokens=2)  # 3 prefix tokens
    scores = score_heads(model, [torch.randn(4, 3, 32, 32)], progress=False)
    convheads.replace_heads(model, convheads.Selection({1: [0, 3]}), init="attention", scores=scores)
    layer = model.blocks[1].attn
    d = layer.head_dim
    kernels = scores.kernels(3)[1, [0, 3]]
    torch.testing.assert_close(layer.mixer.conv.weight[:, 0], kernels.repeat_interleave(d, dim=0))
    # beta is added before the convolution: the raw weight, divided by the kernel's mean in-grid sum
    # (a 4 x 4 grid: the centre tap lands on it from all 16 patches, a side tap from 12, a corner tap from 9)
    taps = torch.tensor([[9, 12, 9], [12, 16, 12], [9, 12, 9]]) / 16
    mean_sum = (kernels * taps).sum(dim=(-2, -1))
    torch.testing.assert_close(layer.mixer.beta, scores.patch_to_prefix[1, [0, 3]].T.float() / mean_sum)
    torch.testing.assert_close(layer.mixer.alpha, scores.prefix_to_patches[1, [0, 3]].T.float())
    assert layer.mixer.beta.shape == (3, 2)


@pytest.mark.parametrize("batches, match", [
    ([], "yielded 0"),
    ([torch.randn(1, 3, 32, 32)], "at least 2 images"),
    ([torch.randn(2, 3, 30, 32)], "not divisible by the patch size"),
    ([torch.randn(2, 3, 40, 40)], r"built for 32 x 32.*img_size=\(40, 40\)"),
    ([torch.randn(3, 32, 32)], r"image tensors \[B, 3, H, W\]"),
    (["not a tensor"], "image tensors"),
])
def test_bad_batches_get_clear_errors(batches, match):
    with pytest.raises(convheads.ConvHeadsError, match=match):
        score_heads(tiny_vit(), batches, progress=False)


def test_scoring_a_replaced_model_is_refused():
    model = convheads.replace_heads(tiny_vit(), convheads.Selection({0: [0]}))
    with pytest.raises(convheads.ConvHeadsError, match="before replace_heads"):
        score_heads(model, [torch.randn(2, 3, 32, 32)], progress=False)
