"""The pure ASAP functions on hand-made tensors, against the paper's equations written out."""

import math

import pytest
import torch

from asapcli.engine import ops
from asapcli.engine.methods import SpanView
from asapcli.engine.methods.asap import Asap


def test_attention_mass_equals_the_explicit_n_by_n_sum():
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 5)
    scaling = 5**-0.5
    explicit = (queries @ keys.transpose(-1, -2) * scaling).sum(dim=2).mean(dim=1)  # sum over i in I
    assert torch.allclose(ops.attention_mass(queries, keys, scaling), explicit, atol=1e-5)


def test_min_max_maps_the_span_onto_zero_one():
    saliency = ops.min_max(torch.tensor([[2.0, -1.0, 5.0, 0.5]]))
    assert saliency[0, 1] == 0
    assert saliency[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(saliency, (torch.tensor([[2.0, -1.0, 5.0, 0.5]]) + 1) / (6 + ops.EPS))


def test_sg_bimask_is_eq_4():
    saliency = torch.tensor([[0.0, 0.25, 1.0, 0.5]])
    lambda_max = 0.8
    mask = ops.sg_bimask(saliency, lambda_max)[0]
    for i in range(4):
        for j in range(4):
            expected = 0.0 if i >= j else math.log(max(lambda_max * saliency[0, j].item(), ops.EPS))
            assert mask[i, j].item() == pytest.approx(expected, abs=1e-6)


def test_received_attention_equals_softmax_columns_in_any_chunking():
    torch.manual_seed(1)
    queries, keys = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    mask = torch.zeros(1, 1, 6, 9)
    mask[..., 7:] = torch.finfo(torch.float32).min
    probs = torch.softmax(queries @ keys.transpose(-1, -2) * 0.5 + mask, dim=-1)
    expected = probs[..., 2:5].mean(dim=2).mean(dim=1)
    for chunk in (1, 4, 64):
        got = ops.received_attention(queries, keys, mask, 0.5, slice(2, 5), rows_per_chunk=chunk)
        assert torch.allclose(got, expected, atol=1e-6)


def test_contribution_weights_each_head_by_the_value_norm():
    torch.manual_seed(2)
    queries, keys = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 7, 4)
    norms = torch.rand(1, 2, 3) + 0.5  # per head, per span key
    probs = torch.softmax(queries @ keys.transpose(-1, -2), dim=-1)[..., 4:7]
    expected = (probs * norms[:, :, None, :]).mean(dim=2).mean(dim=1)
    got = ops.received_attention(queries, keys, None, 1.0, slice(4, 7), value_norms=norms)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, ops.received_attention(queries, keys, None, 1.0, slice(4, 7)))


def test_max_min_diverse_starts_from_the_loneliest_row_then_goes_farthest():
    # Rows 0 and 1 nearly coincide; 3 is orthogonal to all; 4 sits between 0 and 2.
    features = torch.tensor([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0, 1], [0.7, 0.7, 0]])
    assert ops.max_min_diverse(features, 3).tolist() == [0, 2, 3]
    assert ops.max_min_diverse(features, 5).tolist() == [0, 1, 2, 3, 4]  # each row once


def test_pooled_grid_averages_blocks_and_places_them_at_their_corners():
    features = torch.arange(32, dtype=torch.float32).reshape(16, 2)  # a 4 x 4 grid
    pooled, corners = ops.pooled_grid(features, side=4, cells=2)
    assert pooled[:, 0].tolist() == [5.0, 9.0, 21.0, 25.0]  # e.g. (0 + 2 + 8 + 10) / 4
    assert corners.tolist() == [0, 2, 8, 10]


def test_top_k_returns_positions_in_order():
    assert ops.top_k(torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2]), 3).tolist() == [1, 2, 3]


def _states(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_consolidation_groups_flow_to_higher_saliency_and_are_disjoint():
    # Tokens 0, 2 and 3 point the same way; 1 and 4 are orthogonal to them and to each other.
    hidden = _states([1, 0, 0], [0, 1, 0], [1, 0.05, 0], [1, 0, 0.05], [0, 0, 1])
    saliency = torch.tensor([0.2, 0.9, 0.7, 0.2, 0.1])
    anchor = ops.consolidation_groups(hidden, saliency, threshold=0.9)
    # 2 is the most salient of {0, 2, 3}; 0 and 3 tie at 0.2 and both go to 2.
    assert anchor.tolist() == [2, 1, 2, 2, 4]
    for source, target in enumerate(anchor.tolist()):
        assert anchor[target] == target  # an anchor is never itself absorbed: sets are disjoint
        assert saliency[target] >= saliency[source]


def test_consolidation_ties_go_to_the_lower_position():
    hidden = _states([1, 0], [1, 0.01])
    anchor = ops.consolidation_groups(hidden, torch.tensor([0.5, 0.5]), threshold=0.5)
    assert anchor.tolist() == [0, 0]


def test_consolidation_is_greedy_not_transitive():
    # a~b and b~c but not a~c: the most salient (b) absorbs both, a and c never meet.
    angle = math.radians(40)
    hidden = _states([1, 0], [math.cos(angle), math.sin(angle)], [math.cos(2 * angle), math.sin(2 * angle)])
    anchor = ops.consolidation_groups(hidden, torch.tensor([0.1, 0.9, 0.5]), threshold=0.7)
    assert anchor.tolist() == [1, 1, 1]
    anchor = ops.consolidation_groups(hidden, torch.tensor([0.9, 0.1, 0.5]), threshold=0.7)
    assert anchor.tolist() == [0, 0, 2]  # c is not similar enough to a, and b is already taken


def test_merge_states_is_the_eq_6_convex_combination():
    hidden = _states([1, 0], [0, 1], [3, 3], [5, 5])
    saliency = torch.tensor([0.6, 0.2, 0.0, 0.0])
    anchor = torch.tensor([0, 0, 2, 2])  # 1 merges into 0; 3 into 2 with all-zero weights
    merged = ops.merge_states(hidden, saliency, anchor)
    assert torch.allclose(merged[0], (0.6 * hidden[0] + 0.2 * hidden[1]) / 0.8)
    assert torch.allclose(merged[2], (hidden[2] + hidden[3]) / 2)  # zero weights: plain mean
    assert torch.equal(merged[1], hidden[1]) and torch.equal(merged[3], hidden[3])


def test_asap_select_keeps_exactly_k_and_refills_by_raw_mass():
    # 8 tokens; importance selects 0..3; 1 and 2 duplicate 0 and are absorbed; the pool
    # {4..7} refills two slots by raw mass: 6 and 4.
    hidden = _states([1, 0, 0], [1, 0, 0.01], [1, 0.01, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1])
    span = SpanView(
        start=0,
        hidden=hidden,
        importance=torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.1, 0.1, 0.1]),
        mass=torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 1.0, 9.0, 2.0]),
        saliency=torch.tensor([1.0, 0.5, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0]),
    )
    selection = Asap(merge_threshold=0.95).select(span, k=4)
    assert selection.kept.tolist() == [0, 3, 4, 6]
    assert selection.merged == 2
    assert selection.hidden.shape == (4, 3)
    expected_anchor = (1.0 * hidden[0] + 0.5 * hidden[1] + 0.5 * hidden[2]) / 2.0
    assert torch.allclose(selection.hidden[0], expected_anchor)
    assert torch.equal(selection.hidden[2], hidden[4]) and torch.equal(selection.hidden[3], hidden[6])


def test_asap_merges_no_more_tokens_than_the_pruned_pool_can_refill():
    """k close to the span size: 6 tokens, k = 5, all alike. The pool holds one token, so one
    merge at most (the most salient token absorbs the next in visiting order), and k stay."""
    hidden = _states(*[[1, 0.01 * i] for i in range(6)])
    span = SpanView(
        start=0,
        hidden=hidden,
        importance=torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.1]),
        mass=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0]),
        saliency=torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]),
    )
    selection = Asap(merge_threshold=0.5).select(span, k=5)
    assert selection.merged == 1 and selection.kept.tolist() == [0, 2, 3, 4, 5]
    assert torch.allclose(selection.hidden[0], (1.0 * hidden[0] + 0.8 * hidden[1]) / 1.8)
    anchor = ops.consolidation_groups(hidden, span.saliency, threshold=0.5, limit=2)
    assert anchor.tolist() == [0, 0, 0, 3, 4, 5]


def test_the_merge_budget_goes_to_the_most_salient_anchor_first():
    """Visiting order A, B, x, y (by saliency); A~y and B~x only. One merge allowed: A takes y,
    although x is visited before y."""
    a, b, x, y = [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0.05, 0], [1, 0, 0, 0.05]
    anchor = ops.consolidation_groups(_states(a, b, x, y), torch.tensor([1.0, 0.8, 0.6, 0.4]), 0.9, limit=1)
    assert anchor.tolist() == [0, 1, 2, 0]
    anchor = ops.consolidation_groups(_states(a, b, x, y), torch.tensor([1.0, 0.8, 0.6, 0.4]), 0.9, limit=2)
    assert anchor.tolist() == [0, 1, 1, 0]


def test_asap_select_without_merges_is_plain_top_k():
    torch.manual_seed(0)
    hidden = torch.nn.functional.one_hot(torch.arange(6)).float()  # all orthogonal
    importance = torch.rand(6)
    span = SpanView(start=0, hidden=hidden, importance=importance, mass=torch.rand(6), saliency=torch.rand(6))
    selection = Asap(merge_threshold=0.5).select(span, k=3)
    assert selection.kept.tolist() == ops.top_k(importance, 3).tolist()
    assert selection.merged == 0
