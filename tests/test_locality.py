"""convheads.locality: the window, the share of attention it holds, and the uniform reference."""
import pytest
import torch
from helpers import head_scores

from convheads import ConvHeadsError
from convheads.locality import local_share, uniform_share, window


def test_the_window_holds_the_neighbours_within_k_over_2_and_clips_at_the_edges():
    w = window((3, 4), 3)
    assert w.shape == (12, 12) and torch.equal(w, w.T)
    assert w[0].sum() == 4 and w[5].sum() == 9          # a corner patch has 4 neighbours (itself included)
    assert w[0, 1] and w[0, 4] and w[0, 5] and not w[0, 2]
    assert window((3, 4), 1).equal(torch.eye(12, dtype=torch.bool))
    with pytest.raises(ConvHeadsError):
        window((3, 4), 2)


def test_a_head_on_its_own_patch_is_local_a_uniform_one_is_at_the_reference_and_a_far_one_is_not():
    grid, P = (4, 4), 1
    N = P + 16
    diagonal = torch.zeros(N, N)
    diagonal[P:, P:] = torch.eye(16)
    diagonal[:P, :] = 1 / N
    far = torch.zeros(N, N)
    far[P:, P:] = torch.eye(16).flip(-1)                 # patch i attends to patch 15 - i
    for i in (5, 6, 9, 10):                              # the middle four's mirror is a neighbour: move it
        far[P + i] = 0
        far[P + i, 0] = 1                                # onto the class token (never local)
    uniform = torch.full((N, N), 1 / N)
    mean = torch.stack([diagonal, uniform, far])[None]   # [1 block, 3 heads, N, N]
    scores = head_scores(torch.zeros(1, 3), grid_size=grid, num_prefix_tokens=P, mean_attention=mean.half())
    share = local_share(scores, 3)
    assert share.shape == (1, 3)
    assert share[0, 0] == pytest.approx(1.0)
    assert share[0, 1] == pytest.approx(uniform_share(grid, P, 3), abs=1e-3)
    assert share[0, 2] == pytest.approx(0.0)
    assert uniform_share(grid, P, 3) == pytest.approx((4 * 4 + 8 * 6 + 4 * 9) / 16 / N)


def test_scores_whose_attention_does_not_match_their_grid_are_refused():
    scores = head_scores(torch.zeros(1, 1), grid_size=(2, 2), num_prefix_tokens=1,
                         mean_attention=torch.zeros(1, 1, 6, 6, dtype=torch.float16))
    with pytest.raises(ConvHeadsError, match="covers 5 patches but their grid is"):
        local_share(scores)
