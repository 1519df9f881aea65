"""The controls: a random selection at the same budget, and dropping the selected heads outright."""
import copy

import torch
from helpers import SIGMA, tiny_vit
from helpers import head_scores as scores_of

import convheads
from convheads import Selection, count_params, model_cost, replace_heads, select_heads
from convheads.engine.training import new_parameters


def test_random_selection_is_seeded_and_takes_the_same_budget():
    scores = scores_of(SIGMA)
    for granularity, count in (("head", 4), ("block", 2)):
        picks = [select_heads(scores, count=count, granularity=granularity, method="random", seed=s)
                 for s in range(6)]
        assert {p.num_replaced for p in picks} == {count if granularity == "head" else 3 * count}
        assert picks[0] == select_heads(scores, count=count, granularity=granularity, method="random", seed=0)
        assert len({str(p.heads) for p in picks}) > 1  # the seed matters


def test_drop_removes_exactly_the_heads_qkv_rows_and_output_columns():
    """Block 0 loses heads 1 and 3 (their Q, K, V rows and biases, and their W_O columns), block 1
    all its heads (only W_O's bias stays); the function is the original with those heads' outputs
    zeroed before W_O."""
    model = tiny_vit()                                  # width 32, 4 heads of 8
    reference = copy.deepcopy(model)
    names = {n: p.shape for n, p in model.named_parameters()}
    replace_heads(model, Selection({0: [1, 3], 1: [0, 1, 2, 3]}), variant="drop")
    C, d = 32, 8
    assert count_params(reference) - count_params(model) == 2 * (3 * d * (C + 1) + d * C) + (3 * C * (C + 1) + C * C)
    after = {n: p.shape for n, p in model.named_parameters()}
    assert set(names) - set(after) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", *(
        f"blocks.1.attn.{p}" for p in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"))}
    assert set(after) - set(names) == {"blocks.0.attn.in_proj.weight", "blocks.0.attn.in_proj.bias",
                                       "blocks.1.attn.bias"}
    assert after["blocks.0.attn.in_proj.weight"] == (3 * 2 * d, C) and after["blocks.0.attn.proj.weight"] == (C, 2 * d)
    assert not new_parameters(model)                    # nothing new to train
    with torch.no_grad():
        for b, heads in ((0, [1, 3]), (1, [0, 1, 2, 3])):
            for h in heads:
                reference.blocks[b].attn.proj.weight[:, h * d:(h + 1) * d] = 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    assert model_cost(model).macs < model_cost(reference).macs


def test_dropped_model_saves_loads_and_exports(tmp_path):
    model = tiny_vit()
    replace_heads(model, Selection({0: [2], 2: [0, 1, 2, 3]}), variant="drop")
    convheads.save_model(model, tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(convheads.load_model(tmp_path / "m.pt")(x), model(x), atol=1e-6)
    path = convheads.export_onnx(model, tmp_path / "m.onnx", batch_size=2)
    from convheads.export import OnnxModel

    assert torch.allclose(torch.as_tensor(OnnxModel(path)(x)), model(x), atol=1e-4)
