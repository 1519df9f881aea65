"""Every implementation of the spatial mixing computes the reference convolution, and the chosen
one survives save/load, torch.compile and ONNX export."""
import onnx
import pytest
import torch
import torch.nn.functional as F
from helpers import prefixed_vit, replaced_tiny, tiny_vit

import convheads
from convheads import ConvHeadsError, Selection, replace_heads
from convheads.mixing import IMPLEMENTATIONS, ParameterCache, choose, depthwise_mix


def reference_mix(v, layer):
    """The straightforward way, head by head: prefix scalars, then a channels-first depthwise conv."""
    P, (h, w), d = layer.num_prefix_tokens, layer.grid_size, layer.head_dim
    weight = layer.mixer.conv.weight
    out = []
    for i in range(v.shape[-1] // d):
        vi = v[..., i * d:(i + 1) * d]
        pre, pat = vi[:, :P], vi[:, P:]
        if P:
            pre = pre + layer.mixer.alpha[:, i, None] * pat.mean(1, keepdim=True)
            pat = pat + (layer.mixer.beta[:, i, None] * vi[:, :P]).sum(1, keepdim=True)
        grid = pat.transpose(1, 2).reshape(v.shape[0], d, h, w)
        conv = F.conv2d(grid, weight[i * d:(i + 1) * d], padding=weight.shape[-1] // 2, groups=d)
        out.append(torch.cat([pre, conv.flatten(2).transpose(1, 2)], dim=1))
    return torch.cat(out, dim=-1)


def mixing_layer(prefix, grid, kernel_size=3):
    """A layer with every head replaced, random kernels and prefix scalars, on a grid x patch grid."""
    model = tiny_vit(img_size=(grid[0] * 4, grid[1] * 4), patch_size=4, class_token=prefix > 0,
                     reg_tokens=max(0, prefix - 1), global_pool="token" if prefix else "avg")
    replace_heads(model, Selection.from_blocks([0], 4), kernel_size=kernel_size)
    layer = model.blocks[0].attn
    with torch.no_grad():
        layer.mixer.conv.weight.normal_()
        for p in layer.mixing_parameters()[1:]:
            p.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (8, 8)])
def test_every_implementation_is_the_reference_convolution_with_the_same_gradients(prefix, grid):
    layer = mixing_layer(prefix, grid, kernel_size=5 if grid == (5, 3) else 3)
    v = torch.randn(2, prefix + grid[0] * grid[1], layer.mixer.conv.out_channels)
    with torch.no_grad():
        expected = reference_mix(v, layer)
    params = [v] + layer.mixing_parameters()
    for how in IMPLEMENTATIONS + ("auto",):
        layer.mixing = how
        for train in (True, False):
            layer.train(train)
            with torch.no_grad():
                torch.testing.assert_close(layer.mixer(v, layer.grid_size), expected, atol=1e-5, rtol=1e-5)
            x = v.clone().requires_grad_()
            out = layer.mixer(x, layer.grid_size)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            grads = torch.autograd.grad((out * expected).sum(), [x] + params[1:])
            ref = torch.autograd.grad((reference_mix(x, layer) * expected).sum(), [x] + params[1:])
            for g, r in zip(grads, ref):
                torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize("global_term", [False, True])
def test_a_shift_mixes_the_shifted_values(prefix, global_term):
    """depthwise_mix(v, shift=s) is depthwise_mix(v + s) on every path, though it never forms v + s."""
    heads, d, (h, w) = 4, 8, (5, 3)
    C = heads * d
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, prefix + h * w, C, generator=g)
    shift = 3 * torch.randn(C, generator=g)
    params = dict(weight=torch.randn(C, 1, 3, 3, generator=g), grid_size=(h, w), head_dim=d,
                  alpha=torch.randn(prefix, heads, generator=g) if prefix else None,
                  beta=torch.randn(prefix, heads, generator=g) if prefix else None)
    if global_term:
        params.update(gamma=torch.randn(heads, generator=g),
                      phi=torch.randn(prefix, prefix, heads, generator=g) if prefix else None)
    for how in ("conv", "shift"):
        torch.testing.assert_close(depthwise_mix(v, how=how, shift=shift, **params),
                                   depthwise_mix(v + shift, how=how, **params), atol=1e-4, rtol=1e-5)


def test_the_choice_follows_shape_device_and_mode():
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert choose(1, 17, 128, 1, cpu) == "banded"        # a tiny grid, inference
        assert choose(1, 50, 128, 1, cpu) == "banded"        # prefix tokens cost the other paths more ...
        assert choose(1, 49, 128, 0, cpu) == "shift"         # ... so banded reaches further with them
        assert choose(1, 65, 128, 1, cpu) == "shift"         # the digits default at batch 1
        assert choose(1, 145, 384, 1, cpu) == "conv"         # past shift's size at batch 1
        assert choose(64, 17, 128, 1, cpu) == "conv"         # a batch: the library convolution
        assert choose(1, 577, 128, 1, cpu) == "conv"         # a large grid
        assert choose(1, 17, 128, 1, torch.device("meta")) == "conv"
    assert choose(1, 17, 128, 1, cpu) == "conv"              # gradients flow: training takes the convolution


def test_the_inference_matrix_follows_every_change_of_the_parameters():
    layer = mixing_layer(1, (4, 4)).eval()
    layer.mixing = "banded"
    v = torch.randn(1, 17, layer.mixer.conv.out_channels)
    with torch.inference_mode():
        before = layer.mixer(v, layer.grid_size)
    with torch.no_grad():                                    # built under inference mode, reused outside it
        torch.testing.assert_close(layer.mixer(v, layer.grid_size), before)
    layer.mixer.conv.weight.data.mul_(2)                           # .data writes bump no version counter
    layer.mixer.alpha.data.add_(1)
    with torch.no_grad():
        torch.testing.assert_close(layer.mixer(v, layer.grid_size), reference_mix(v, layer), atol=1e-5, rtol=1e-5)
    state = {k: v + 1 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(layer.mixer(v, layer.grid_size), reference_mix(v, layer), atol=1e-5, rtol=1e-5)


def test_a_parameter_cache_recomputes_while_gradients_flow():
    cache, p, calls = ParameterCache(), torch.nn.Parameter(torch.ones(3)), []

    def compute():
        calls.append(1)
        return p * 2

    for _ in range(2):
        assert cache.get("k", [p], compute).requires_grad
    with torch.no_grad():
        cache.get("k", [p], compute)
        cache.get("k", [p], compute)
        cache.get("other key", [p], compute)
    assert len(calls) == 4


@pytest.mark.parametrize("how", IMPLEMENTATIONS)
def test_the_chosen_implementation_survives_save_load_and_onnx_export(how, tmp_path):
    model = replaced_tiny()
    for block in model.blocks:
        if isinstance(block.attn, convheads.ReplacedAttention):
            block.attn.mixing = how
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    convheads.save_model(model, tmp_path / "m.pt")
    again = convheads.load_model(tmp_path / "m.pt")
    assert {b.attn.mixing for b in again.blocks if isinstance(b.attn, convheads.ReplacedAttention)} == {how}
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=1e-5, rtol=1e-5)
    path = convheads.export_onnx(again, tmp_path / "m.onnx", batch_size=2)
    assert convheads.check_onnx(again, path) < 1e-4
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ("Conv" in ops and "Pad" not in ops) if how == "conv" else True


def test_auto_exports_one_conv_node_per_replaced_block(tmp_path):
    model = prefixed_vit(1)
    replace_heads(model, Selection.from_blocks([0, 1], 4))
    path = convheads.export_onnx(model, tmp_path / "m.onnx")
    convs = [n for n in onnx.load(path).graph.node if n.op_type == "Conv"]
    assert len(convs) == 3  # the patch embedding and one per replaced block
    assert convheads.check_onnx(model, path) < 1e-4


def test_torch_compile_traces_each_implementation_in_one_graph():
    model = replaced_tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for how in ("auto", "banded"):
        for block in model.blocks:
            if isinstance(block.attn, convheads.ReplacedAttention):
                block.attn.mixing = how
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_an_unknown_implementation_is_refused():
    layer = mixing_layer(0, (4, 4))
    with pytest.raises(ConvHeadsError, match="mixing implementation must be 'auto' or one of"):
        layer.mixing = "fft"
