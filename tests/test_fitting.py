"""The depthwise + global variant, the fixed variant and the attention fit: exact maths, what the fit
reproduces, the fit score and the selection methods that use it."""
import copy

import pytest
import torch
from helpers import banded_attention, head_scores, prefixed_vit, tiny_vit, value_and_output_weights

import convheads
from convheads import ConvHeadsError, HeadScores, Selection, fit_scores, replace_heads, score_heads, select_heads
from convheads.engine.training import new_parameters
from convheads.fitting import BETA_MASS, fit_mixing, implied_attention


def global_matrix(kernel, gamma, phi, alpha, beta, h, w, P):
    """The fixed [N, N] attention matrix (rows: queries) that a depthwise_global head equals: the band
    of the kernel plus the uniform weight gamma / N on every key from every patch, prefix tokens
    reaching the patches through beta and the kernel, prefix rows phi and alpha / hw per patch."""
    N = P + h * w
    band = banded_attention(kernel, h, w)                              # [hw, hw]
    A = torch.zeros(N, N)
    A[P:, P:] = band
    if P:
        A[P:, :P] = band.sum(dim=1, keepdim=True) * beta[None]        # beta x the in-grid kernel sum
        A[:P, :P] = phi
        A[:P, P:] = alpha[:, None] / (h * w)
    A[P:] += gamma / N
    return A


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_depthwise_global_equals_attention_with_band_plus_uniform_plus_prefix_terms(prefix):
    model = prefixed_vit(prefix)
    attn = model.blocks[1].attn
    H, d, C = attn.num_heads, attn.head_dim, attn.qkv.in_features
    w_v, b_v, w_o, b_o = value_and_output_weights(attn)
    replace_heads(model, Selection({1: range(H)}), variant="depthwise_global")
    layer = model.blocks[1].attn
    with torch.no_grad():
        for p in layer.mixing_parameters():
            p.normal_()
    layer.mixer.init_kernels(torch.randn(H, 3, 3))   # one kernel per head, as the attention formula has
    h, w = 5, 3
    x = torch.randn(2, prefix + h * w, C)
    V = x @ w_v.T + b_v
    kernels = layer.mixer.conv.weight[::d, 0]
    heads = []
    for i in range(H):
        P = prefix
        A = global_matrix(kernels[i], layer.mixer.gamma[i], layer.mixer.phi[..., i] if P else None,
                          layer.mixer.alpha[:, i] if P else None, layer.mixer.beta[:, i] if P else None, h, w, P)
        heads.append(A @ V[..., i * d:(i + 1) * d])
    expected = torch.cat(heads, -1) @ w_o.T + b_o
    for how in ("conv", "shift", "banded"):
        layer.mixing = how
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def uniform_model(prefix):
    """A model whose block 1 attends exactly uniformly: W_Q = W_K = 0 (and their biases)."""
    model = prefixed_vit(prefix, depth=2)
    C = model.blocks[1].attn.qkv.in_features
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[:2 * C] = 0
        model.blocks[1].attn.qkv.bias[:2 * C] = 0
    return model


@pytest.mark.parametrize("prefix", [0, 5])
def test_a_uniform_head_is_reproduced_by_the_fitted_global_layer_and_not_by_depthwise(prefix):
    model = uniform_model(prefix)
    x = torch.randn(3, 3, 40, 24)
    scores = score_heads(model, [x], progress=False)
    tokens = []
    hook = model.blocks[1].attn.register_forward_pre_hook(lambda m, args: tokens.append(args[0]))
    with torch.no_grad():
        model.forward_features(x)
        hook.remove()
        expected = model.blocks[1].attn(tokens[0])
    errors = {}
    for variant in ("depthwise", "depthwise_global", "fixed"):
        replaced = replace_heads(copy.deepcopy(model), Selection.from_blocks([1], 4), variant=variant,
                                 init="attention", scores=scores)
        with torch.no_grad():   # relative to the attention output's size
            error = (replaced.blocks[1].attn(tokens[0]) - expected).abs().max() / expected.abs().max()
            errors[variant] = error.item()
    assert errors["depthwise_global"] < 1e-5
    assert errors["fixed"] < 1e-3           # E[A] is stored in half precision
    assert errors["depthwise"] > 0.1
    fit = fit_scores(scores, 3)
    assert fit[1].min() > 0.999 and fit_scores(scores, 3, "depthwise")[1].max() < 0.9


def test_the_prefix_fit_matches_what_the_layer_computes():
    """beta is added before the convolution: the fitted layer gives each prefix token the mean weight on
    the patches that E[A] has (a raw beta would be too small by the kernel's sum), unless the kernel's
    mass is below BETA_MASS: then beta is guarded (bounded by excess / BETA_MASS) and the weight falls short."""
    model = prefixed_vit(5)
    scores = score_heads(model, [torch.randn(4, 3, 40, 24)], progress=False)
    for variant in ("depthwise", "depthwise_global"):
        fit = fit_mixing(scores, 3, variant)
        implied = implied_attention(fit, scores.grid_size, 5)
        weight = implied[..., 5:, :5].mean(dim=-2)                      # [D, H, P]: what the layer gives
        excess = scores.patch_to_prefix.float() - (fit["gamma"][..., None] / implied.shape[-1]
                                                    if "gamma" in fit else 0)
        mass = (weight - scores.patch_to_prefix.float() + excess) / fit["beta"]   # the kernel's mass S
        exact = (mass.abs() >= BETA_MASS).all(dim=-1)
        torch.testing.assert_close(weight[exact], scores.patch_to_prefix.float()[exact], atol=1e-6, rtol=1e-4)
        assert (fit["beta"][~exact].abs() <= excess[~exact].abs() / BETA_MASS + 1e-6).all()
        if variant == "depthwise":  # a random ViT's heads are near-uniform: the depthwise kernel keeps ~9/N of it
            assert exact.all()
        else:  # ... and the global fit takes that as the uniform level: kernels near 0, beta guarded
            assert not exact.all() and fit["beta"].abs().max() < 5
        torch.testing.assert_close(implied[..., :5, 5:].sum(dim=-1), scores.prefix_to_patches.float())
    # the layers start from these parameters
    replace_heads(model, Selection({1: [0, 2]}), variant="depthwise_global", init="attention", scores=scores)
    layer = model.blocks[1].attn
    torch.testing.assert_close(layer.mixer.beta, fit["beta"][1, [0, 2]].T)
    torch.testing.assert_close(layer.mixer.gamma, fit["gamma"][1, [0, 2]])
    torch.testing.assert_close(layer.mixer.phi, scores.prefix_to_prefix[1, [0, 2]].permute(1, 2, 0).float())


def test_fixed_heads_mix_with_their_mean_attention_and_cost_n_squared():
    model = prefixed_vit(1)
    x = torch.randn(2, 3, 40, 24)
    scores = score_heads(model, [x], progress=False)
    attn = model.blocks[0].attn
    d = attn.head_dim
    w_v, b_v, w_o, b_o = value_and_output_weights(attn)
    before = convheads.model_cost(model)
    replace_heads(model, Selection({0: [1, 3]}), variant="fixed", init="attention", scores=scores)
    layer = model.blocks[0].attn
    tokens = torch.randn(2, 16, attn.qkv.in_features)
    V = tokens @ w_v.T + b_v
    E = scores.mean_attention[0].float()
    out = torch.cat([E[h] @ V[..., h * d:(h + 1) * d] for h in (1, 3)], -1)
    with torch.no_grad():
        layer.proj.weight[:, :2 * d] = 0   # silence the kept heads (0, 2: first inside the layer)
        expected = out @ w_o[:, [c for h in (1, 3) for c in range(h * d, (h + 1) * d)]].T + b_o
        torch.testing.assert_close(layer(tokens), expected, atol=1e-5, rtol=1e-5)
    after = convheads.model_cost(model)
    N = 16
    assert before.params - after.params == 2 * 2 * d * (attn.qkv.in_features + 1) - 2 * N * N
    assert before.attention_macs - after.attention_macs == 2 * N * N * d  # Q K^T of two heads gone, A V kept


def test_global_variant_costs_exactly_its_parameters_and_the_convolution():
    model = prefixed_vit(5)
    plain = replace_heads(prefixed_vit(5), Selection({0: [0, 1], 1: range(4)}))
    glob = replace_heads(model, Selection({0: [0, 1], 1: range(4)}), variant="depthwise_global")
    a, b = convheads.model_cost(plain), convheads.model_cost(glob)
    assert b.params - a.params == 6 * (1 + 5 * 5)     # gamma and phi [5, 5] per replaced head
    assert b.macs == a.macs


def test_global_and_fixed_models_train_save_load_and_export(tmp_path):
    model = tiny_vit(reg_tokens=2, depth=3)
    x = torch.randn(2, 3, 32, 32)
    scores = score_heads(model, [x], progress=False)
    replace_heads(model, Selection({0: [1, 2]}), variant="depthwise_global", init="attention", scores=scores)
    replace_heads(model, Selection.from_blocks([1], 4), variant="depthwise_global", init="attention", scores=scores)
    replace_heads(model, Selection({2: [0]}), variant="fixed", init="attention", scores=scores)
    model.train()
    model(x).sum().backward()
    for b in (0, 1):
        mixer = model.blocks[b].attn.mixer
        assert mixer.gamma.grad.abs().sum() > 0 and mixer.phi.grad.abs().sum() > 0
    assert model.blocks[2].attn.mixer.attention.grad.abs().sum() > 0
    assert {id(p) for p in new_parameters(model)} >= {
        id(model.blocks[0].attn.mixer.gamma), id(model.blocks[2].attn.mixer.attention)}
    model.eval()
    path = convheads.save_model(model, tmp_path / "m.pt")
    again = convheads.load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    onnx_path = convheads.export_onnx(again, tmp_path / "m.onnx")
    assert convheads.check_onnx(again, onnx_path) < 1e-4


def test_fit_and_sigma_fit_selection():
    sigma = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    fit = torch.tensor([[0.1, 0.9], [0.8, 0.6]])
    scores = head_scores(sigma)
    import convheads.selection as selection
    original = selection.fit_scores
    selection.fit_scores = lambda s, k, variant: fit     # the ranking's arithmetic, on chosen fits
    try:
        assert select_heads(scores, count=2, method="fit").heads == {0: [1], 1: [0]}
        # ranks: sigma (0, 1, 2, 3), fit (3, 0, 1, 2): sums 3, 1, 3, 5; the tie of heads 0 and 2 goes to lower sigma
        assert select_heads(scores, count=2, method="sigma_fit").heads == {0: [0, 1]}
        assert select_heads(scores, count=1, granularity="block", method="fit").heads == {1: [0, 1]}
    finally:
        selection.fit_scores = original


def test_fit_ranks_by_the_fit_of_the_variant_in_use():
    model = prefixed_vit(1)
    scores = score_heads(model, [torch.randn(4, 3, 40, 24)], progress=False)
    orders = {}
    for variant in ("depthwise", "depthwise_global"):
        fit = fit_scores(scores, 3, variant).flatten()
        chosen = select_heads(scores, count=3, method="fit", variant=variant)
        best = torch.argsort(-fit, stable=True)[:3].tolist()
        assert sorted(b * scores.num_heads + h for b, hs in chosen.heads.items() for h in hs) == sorted(best)
        orders[variant] = best
    assert orders["depthwise"] != orders["depthwise_global"]  # else the test could not tell them apart
    with pytest.raises(ConvHeadsError, match="variant 'identity' has no attention fit.*use method 'sigma'"):
        select_heads(scores, count=1, method="sigma_fit", variant="identity")


def test_bad_fit_requests_get_clear_errors():
    model = tiny_vit()
    scores = score_heads(model, [torch.randn(2, 3, 32, 32)], progress=False)
    with pytest.raises(ConvHeadsError, match="method must be one of"):
        select_heads(scores, count=1, method="dsp-typo")
    older = {k: v for k, v in scores.to_dict().items() if k not in ("mean_attention", "prefix_to_prefix")}
    with pytest.raises(ConvHeadsError, match="without prefix_to_prefix, mean_attention.*score the model again"):
        HeadScores.from_dict(older)
    with pytest.raises(ConvHeadsError, match="variant must be one of"):
        replace_heads(tiny_vit(), Selection({0: [0]}), variant="global")
    with pytest.raises(ConvHeadsError, match='init="attention" needs the scores'):
        replace_heads(tiny_vit(), Selection({0: [0]}), variant="fixed", init="attention")
    with pytest.raises(ConvHeadsError, match="score the model at the resolution"):
        replace_heads(tiny_vit(img_size=48), Selection({0: [0]}), variant="fixed", init="attention", scores=scores)
