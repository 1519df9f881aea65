import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import prefixed_vit, tiny_vit

import convheads
from convheads import ConvHeadsError, Selection
from convheads.dsp import GatedAttention, finalise, gate_model, gates_of, soft_topk, temperature_at
from convheads.engine.training import TrainSettings, param_groups, train


@pytest.mark.parametrize("k", [1, 3, 5])
def test_soft_topk_sums_to_k_and_hardens_as_the_temperature_falls(k):
    scores = torch.randn(8, dtype=torch.float64)
    hot = torch.zeros(8, dtype=torch.float64)
    hot[torch.topk(scores, k).indices] = 1
    gaps = []
    for t in (1.0, 0.1, 0.01, 1e-3):
        w = soft_topk(scores, k, t)
        assert w.sum().item() == pytest.approx(k, abs=1e-9)
        assert w.min() >= 0 and w.max() <= 1 + 1e-9
        gaps.append((w - hot).abs().max().item())
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.1 and gaps[-1] < 1e-6


def test_temperature_falls_log_linearly():
    assert temperature_at(0, 1.0, 1e-3, 4) == 1.0
    assert temperature_at(1, 1.0, 1e-3, 4) == pytest.approx(0.1)
    assert temperature_at(3, 1.0, 1e-3, 4) == pytest.approx(1e-3)
    assert temperature_at(10, 1.0, 1e-3, 4) == pytest.approx(1e-3)  # then stays at the end


def test_bad_k_and_a_rising_schedule_fail_before_anything_changes():
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConvHeadsError, match="k must be an integer from 1 to 3"):
        gate_model(model, k=4)
    with pytest.raises(ConvHeadsError, match="must fall"):
        gate_model(model, k=1, temperature=(1e-3, 1.0))
    assert gates_of(model) is None and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gated_block_mixes_the_branches_and_its_conv_branch_moves_the_channel_axis():
    """w = 0: the original attention; w = 1: each head's values laid out (B, C, h, w) and convolved
    depthwise, on a 5 x 3 grid with 3 prefix tokens (a reshape that skips the channel move, or
    forgets the prefix tokens, gives other numbers)."""
    model = prefixed_vit(3)
    attn = model.blocks[0].attn
    layer = GatedAttention(copy.deepcopy(attn), (5, 3), 3)
    with torch.no_grad():
        layer.mixer.conv.weight.normal_()
        layer.mixer.beta.zero_()
        layer.mixer.alpha.zero_()
    x = torch.randn(2, 3 + 15, 32)
    layer.eval()
    layer.weight = torch.zeros(4)
    assert torch.allclose(layer(x), attn(x), atol=1e-5)
    layer.weight = torch.ones(4)
    v = F.linear(x, attn.qkv.weight[64:], attn.qkv.bias[64:])                  # [B, N, C]
    grid = v[:, 3:].transpose(1, 2).reshape(2, 32, 5, 3)                        # (B, N, C) -> (B, C, h, w)
    conv = F.conv2d(grid, layer.mixer.conv.weight, padding=1, groups=32).flatten(2).transpose(1, 2)
    expected = attn.proj(torch.cat([v[:, :3], conv], dim=1))                     # prefix: alpha = 0 keeps V
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("granularity,k", [("block", 2), ("head", 5)])
def test_finalised_model_is_the_directly_replaced_model(granularity, k):
    base = prefixed_vit(3, depth=4)
    batches = [torch.randn(4, 3, 40, 24) for _ in range(2)]
    scores = convheads.score_heads(base, batches, progress=False)
    gated = copy.deepcopy(base)
    gates = gate_model(gated, k, granularity, init="attention", scores=scores)
    with torch.no_grad():
        gates.logits.copy_(torch.randn(len(gates.logits)))
    x = torch.randn(3, 3, 40, 24)
    gated.eval()
    hard = gated(x)
    selection = finalise(gated)
    assert selection.num_replaced == (k * 4 if granularity == "block" else k)
    direct = convheads.replace_heads(copy.deepcopy(base), selection, init="attention", scores=scores)
    assert type(gated.blocks[0].attn) is type(direct.blocks[0].attn)
    assert sorted(gated.state_dict()) == sorted(direct.state_dict())
    assert torch.allclose(gated(x), direct(x), atol=1e-5)
    assert torch.allclose(gated(x), hard, atol=1e-5)  # the gated model in evaluation: its hard top-k
    assert convheads.replaced_selection(gated) == selection


def test_gates_train_in_their_own_group_with_the_same_noise_for_a_given_seed(tmp_path):
    def run():
        torch.manual_seed(0)
        model = tiny_vit()
        gates = gate_model(model, 1, anneal_steps=4, seed=3)
        data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(2)]
        groups = param_groups(model, weight_decay=0.05)
        assert groups[-1] == {"params": [gates.logits], "lr": 0.01, "weight_decay": 0.0}
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        train(model, data, TrainSettings(epochs=2, warmup_epochs=0), progress=False)
        return gates.logits.detach().clone(), int(gates.step), finalise(model)

    (a, steps, sel_a), (b, _, sel_b) = run(), run()
    assert steps == 4 and torch.equal(a, b) and sel_a == sel_b and a.abs().sum() > 0


def test_finalised_model_saves_and_loads(tmp_path):
    model = tiny_vit()
    gate_model(model, 2, "head")
    model.dsp_gates.logits.data[[1, 6]] = 1.0
    assert finalise(model) == Selection({0: [1], 1: [2]}, depth=3, num_heads=4)
    convheads.save_model(model, tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(convheads.load_model(tmp_path / "m.pt")(x), model(x), atol=1e-6)


def test_dsp_gates_the_backbone_of_a_segmentation_model():
    torch.manual_seed(0)
    base = convheads.SegmentationModel(convheads.as_vit(tiny_vit(depth=4, num_classes=0)), 4, [1, 3]).eval()
    scores = convheads.score_heads(base, [torch.randn(4, 3, 32, 32)], progress=False)
    gated = copy.deepcopy(base)
    gates = gate_model(gated, 2, "block", init="attention", scores=scores)
    groups = param_groups(gated, weight_decay=0.05)
    assert groups[-1]["params"] == [gates.logits]  # the gates' own group, not among the head's
    assert sum(len(g["params"]) for g in groups) == len(list(gated.parameters()))
    with torch.no_grad():
        gates.logits.copy_(torch.tensor([0.0, 3.0, 0.0, 2.0] + [0.0] * (len(gates.logits) - 4)))
    gated.eval()
    x = torch.randn(2, 3, 32, 32)
    hard = gated(x)
    assert hard.shape == (2, 4, 32, 32)
    selection = finalise(gated)
    assert sorted(selection.heads) == [1, 3]
    direct = convheads.replace_heads(copy.deepcopy(base), selection, init="attention", scores=scores)
    assert torch.allclose(gated(x), direct(x), atol=1e-5) and torch.allclose(gated(x), hard, atol=1e-5)
