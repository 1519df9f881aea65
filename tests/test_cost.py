from helpers import tiny_vit

from convheads import model_cost


def test_macs_of_an_unmodified_vit_follow_the_formula():
    C, D, N, p = 32, 3, 17, 8                 # tiny_vit: 4 x 4 patches + CLS, 5 classes, MLP ratio 4
    cost = model_cost(tiny_vit())
    patch_embed = 16 * C * 3 * p * p
    per_block = N * (3 * C * C + C * C + 2 * 4 * C * C) + 2 * N * N * C
    assert cost.macs == patch_embed + D * per_block + C * 5
    assert cost.attention_macs == D * 2 * N * N * C
    assert cost.params == sum(p.numel() for p in tiny_vit().parameters())


def test_cost_restores_training_mode():
    model = tiny_vit().train()
    model_cost(model)
    assert model.training
