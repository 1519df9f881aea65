import pytest
from helpers import SIGMA
from helpers import head_scores as scores_of

from convheads import ConvHeadsError, Selection, select_heads


def test_head_granularity_takes_the_globally_lowest_heads_ties_by_index():
    sel = select_heads(scores_of(SIGMA), count=4)
    assert sel.heads == {0: [1], 1: [0, 1], 2: [0]}
    assert sel.num_replaced == 4 and (sel.depth, sel.num_heads) == (3, 3)


def test_block_granularity_takes_whole_blocks_by_mean_sigma():
    # sigma_b = [4.33, 4.33, 5.5]: blocks 0 and 1 tie, block 0 first
    assert select_heads(scores_of(SIGMA), count=1, granularity="block").heads == {0: [0, 1, 2]}
    assert select_heads(scores_of(SIGMA), count=2, granularity="block").heads == {0: [0, 1, 2], 1: [0, 1, 2]}


def test_sigma_high_takes_the_other_end_of_the_ranking():
    # sigma_b = [4.33, 4.33, 5.5]: block 2 has the highest; ties keep index order
    assert select_heads(scores_of(SIGMA), count=1, granularity="block", method="sigma_high").heads == {2: [0, 1, 2]}
    low = select_heads(scores_of(SIGMA), count=4)
    high = select_heads(scores_of(SIGMA), count=5, method="sigma_high")
    assert low.num_replaced + high.num_replaced == 9
    pairs = [{(b, h) for b, hs in sel.heads.items() for h in hs} for sel in (low, high)]
    assert not pairs[0] & pairs[1]


def test_fraction_rounds_to_a_count_of_at_least_one():
    assert select_heads(scores_of(SIGMA), fraction=0.5).num_replaced == 4  # round(4.5) = 4 (banker's)
    assert select_heads(scores_of(SIGMA), fraction=0.01).num_replaced == 1
    assert len(select_heads(scores_of(SIGMA), fraction=1.0, granularity="block").heads) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(count=0), "count must be an integer from 1 to 9"),
    (dict(count=10), "from 1 to 9"),
    (dict(count=4, granularity="block"), "from 1 to 3 .the model's blocks"),
    (dict(count=2.5), "integer"),
    (dict(fraction=0.0), r"fraction must be in \(0, 1\]"),
    (dict(fraction=1.5), "fraction"),
    (dict(), "exactly one of"),
    (dict(count=1, fraction=0.5), "exactly one of"),
    (dict(count=1, granularity="layer"), "granularity must be one of"),
])
def test_bad_selection_arguments(kwargs, match):
    with pytest.raises(ConvHeadsError, match=match):
        select_heads(scores_of(SIGMA), **kwargs)


def test_explicit_mappings_are_normalised_and_round_trip():
    sel = Selection({8: [2, 0, 1], 6: [5], 3: []})
    assert sel.heads == {6: [5], 8: [0, 1, 2]}
    assert Selection.from_dict(sel.to_dict()) == sel
    paper = Selection.from_blocks([8, 6, 4, 9, 7, 5, 10, 1, 3, 11, 13, 12], num_heads=16)
    assert list(paper.heads) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] and paper.num_replaced == 192


@pytest.mark.parametrize("heads, match", [
    ({0: [1, 1]}, "twice"),
    ({-1: [0]}, "non-negative integers"),
    ({0: [0.5]}, "non-negative integers"),
    ({"1": [0]}, "non-negative integers"),
])
def test_bad_explicit_mappings(heads, match):
    with pytest.raises(ConvHeadsError, match=match):
        Selection(heads)


def test_a_selection_checks_the_model_shape():
    Selection({2: [3]}).check(depth=3, num_heads=4)
    with pytest.raises(ConvHeadsError, match="block 3 but the model has 3 blocks"):
        Selection({3: [0]}).check(depth=3, num_heads=4)
    with pytest.raises(ConvHeadsError, match="head 4 of block 0 but the model has 4 heads"):
        Selection({0: [4]}).check(depth=3, num_heads=4)
    with pytest.raises(ConvHeadsError, match="made for a model with 12 blocks x 6 heads"):
        Selection({0: [0]}, depth=12, num_heads=6).check(depth=3, num_heads=4)
