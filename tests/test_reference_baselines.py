"""Tests of tests/reference_baselines.py: hand-computed tiny cases, invariants, the official odd cases.

The references were checked equal to the official code (run out of tree); these tests pin their
behaviour without it. Expected values below are worked out by hand in the comments.
"""

import math

import pytest
import reference_baselines as ref
import torch

F64 = torch.float64


def unit2(c):
    """A 2-D unit vector whose cosine with (1, 0) is c."""
    return [c, math.sqrt(1 - c * c)]


# ----------------------------------------------------------------------------- VisPruner


def _vispruner_hand_inputs():
    # N = 20; attention decreasing with the index, so argsort(descending) = 0, 1, ..., 19.
    attn = torch.tensor([(20 - i) / 100 for i in range(20)], dtype=F64)
    feats = torch.zeros(20, 2, dtype=F64)
    feats[:] = torch.tensor([1.0, 0.0], dtype=F64)  # every odd-place token points along (1, 0)
    # even places of the residual list (patches 8, 10, ..., 18): cosines with (1, 0)
    for patch, c in zip([8, 10, 12, 14, 16, 18], [0.1, 0.9, 0.3, 0.7, 0.5, 0.2]):
        feats[patch] = torch.tensor(unit2(c), dtype=F64)
    return attn, feats


def test_vispruner_hand_case():
    # T = 16, ratio 0.5: T_imp = 8 -> patches 0..7; residual 8..19 (R = 12), T_div = 8.
    # Round 1: r = min(8, 12 - 8) = 4; evens 8,10,12,14,16,18 score 0.1,0.9,0.3,0.7,0.5,0.2;
    # the 4 best matched (10, 14, 16, 12) go; survivors in descending-score order: 18 (0.2), 8 (0.1);
    # residual = [18, 8] + odds [9, 11, 13, 15, 17, 19]; R = 8 = T_div: stop.
    attn, feats = _vispruner_hand_inputs()
    result = ref.vispruner_select(attn, feats, 16, 0.5)
    assert result.important.tolist() == list(range(8))
    assert result.diverse.tolist() == [18, 8, 9, 11, 13, 15, 17, 19]
    assert result.kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15, 17, 18, 19]


def test_vispruner_heads_are_averaged():
    attn, feats = _vispruner_hand_inputs()
    two_heads = torch.stack([attn * 2, torch.zeros_like(attn)])  # mean over heads = attn
    assert (
        ref.vispruner_select(two_heads, feats, 16).kept.tolist() == ref.vispruner_select(attn, feats, 16).kept.tolist()
    )


def test_vispruner_odd_residual_quirk_and_natural_mode():
    # N = 9, T = 5, ratio 0.75: T_imp = 3 (patches 0, 1, 2), residual 3..8 (R = 6), T_div = 2.
    # Round 1: r = min(8, 4) = 4 >= 3 evens -> none survives -> residual = odds [4, 6, 8].
    # Round 2: R = 3, r = 1; evens 4, 8 against odd 6; 4 matches 6 better (cos 0.9 vs 0.1) and goes.
    # Official: the index is expanded to R // 2 - r = 0 columns and broadcasts the one survivor
    # away -> residual [6], 4 tokens. Natural: 8 survives -> residual [8, 6], 5 tokens.
    attn = torch.tensor([(9 - i) / 10 for i in range(9)], dtype=F64)
    feats = torch.tensor([[1.0, 0.0]] * 9, dtype=F64)
    feats[4] = torch.tensor(unit2(0.9), dtype=F64)
    feats[8] = torch.tensor(unit2(0.1), dtype=F64)
    official = ref.vispruner_select(attn, feats, 5, 0.75)
    assert official.kept.tolist() == [0, 1, 2, 6]
    natural = ref.vispruner_select(attn, feats, 5, 0.75, residual_mode="natural")
    assert natural.diverse.tolist() == [8, 6]
    assert natural.kept.tolist() == [0, 1, 2, 6, 8]


def test_vispruner_rounds_drop_up_to_eight():
    # N = 20, T = 4, ratio 0.5: important [0, 1]; residual 2..19 (R = 18), T_div = 2.
    # Round 1: r = min(8, 16) = 8 of the 9 evens (2, 4, ..., 18) go; 18 (cosine 0) survives:
    # residual [18, 3, 5, ..., 19]. Round 2: R = 10, r = 8 >= 5 evens: the official code expands its
    # index to 5 - 8 = -3 columns and fails; natural: all 5 evens (18, 5, 9, 13, 17) go ->
    # [3, 7, 11, 15, 19]. Round 3: R = 5, r = 3: evens 3, 11, 19 go -> [7, 15] = T_div.
    attn = torch.tensor([(20 - i) / 100 for i in range(20)], dtype=F64)
    feats = torch.tensor([[1.0, 0.0]] * 20, dtype=F64)
    for patch, c in zip(range(2, 18, 2), [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]):
        feats[patch] = torch.tensor(unit2(c), dtype=F64)
    feats[18] = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="fails"):
        ref.vispruner_select(attn, feats, 4)
    natural = ref.vispruner_select(attn, feats, 4, residual_mode="natural")
    assert natural.diverse.tolist() == [7, 15]
    assert natural.kept.tolist() == [0, 1, 7, 15]


def test_vispruner_odd_residual_fails_like_official():
    # T = 102 at N = 576: R = 576 - 51 = 525 is odd -> the official code fails in its first round.
    torch.manual_seed(0)
    attn, feats = torch.rand(576, dtype=F64), torch.randn(576, 8, dtype=F64)
    with pytest.raises(ValueError, match="odd residual"):
        ref.vispruner_select(attn, feats, 102)
    # same at N = 144, T = 26 (R = 131); the natural mode keeps the whole budget
    with pytest.raises(ValueError, match="odd residual"):
        ref.vispruner_select(attn[:144], feats[:144], 26)
    kept = ref.vispruner_select(attn[:144], feats[:144], 26, residual_mode="natural").kept
    assert kept.numel() == 26 and kept.unique().numel() == 26


@pytest.mark.parametrize("n, budget", [(144, 16), (144, 32), (144, 48), (576, 448)])
def test_vispruner_invariants(n, budget):
    torch.manual_seed(budget)
    attn, feats = torch.softmax(torch.randn(16, n, dtype=F64), -1), torch.randn(n, 8, dtype=F64)
    result = ref.vispruner_select(attn, feats, budget)
    kept = result.kept
    assert kept.numel() == budget and kept.unique().numel() == budget
    assert torch.equal(kept, kept.sort().values)  # patch order
    # the important half is the top of the head-mean attention
    assert set(result.important.tolist()) == set(attn.mean(0).topk(budget // 2).indices.tolist())
    assert set(kept.tolist()) == set(result.important.tolist()) | set(result.diverse.tolist())


def test_vispruner_budget_edges():
    attn, feats = _vispruner_hand_inputs()
    assert ref.vispruner_select(attn, feats, 25).kept.tolist() == list(range(20))  # T >= N keeps all
    assert ref.vispruner_select(attn, feats, 6, 1.0).kept.tolist() == list(range(6))  # attention only
    flat = torch.full((20,), 0.05, dtype=F64)  # all tied: stable mode takes the lowest indices
    assert ref.vispruner_select(flat, feats, 6, 1.0, tie_break="stable").kept.tolist() == list(range(6))
    with pytest.raises(ValueError):
        ref.vispruner_select(attn, feats, 6, tie_break="random")


# ----------------------------------------------------------------------------- VisionZip


def _visionzip_hand_inputs():
    # 8 patches + [CLS]; two heads whose sum ranks patch 5 (position 6) then patch 2 (position 3).
    head0 = torch.tensor([0.01, 0.30, 0.02, 0.03, 0.04, 0.20, 0.05, 0.06], dtype=F64)
    head1 = torch.tensor([0.01, 0.05, 0.02, 0.03, 0.04, 0.40, 0.05, 0.06], dtype=F64)
    hidden = torch.tensor([[p, 10.0 * p] for p in range(9)], dtype=F64)  # position p -> (p, 10p)
    keys = torch.zeros(9, 2, dtype=F64)
    keys[1], keys[5] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # the two targets
    keys[2], keys[7] = torch.tensor([1.0, 0.1]), torch.tensor([1.0, 0.5])  # -> target at position 1
    keys[4], keys[8] = torch.tensor([0.2, 1.0]), torch.tensor([0.1, 1.0])  # -> target at position 5
    keys[0], keys[3], keys[6] = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0])
    return torch.stack([head0, head1]), hidden, keys


def test_visionzip_hand_case():
    # dominant = 3 ([CLS] + 2 patches): head sums over the 8 patches = [.02, .35, .04, .06, .08,
    # .60, .10, .12] -> top-2 = patch 5, patch 1 = positions 6, 2; dominant positions [0, 2, 6].
    # Remaining positions [1, 3, 4, 5, 7, 8] (M = 6), contextual 2: step 3 -> targets at places
    # 0 and 3 = positions 1 and 5. Others: position 3 (key (3,1) -> target 1), 4 (-> 5),
    # 7 (-> 1), 8 (-> 5). Contextual = target + mean of members:
    # position 1: (1, 10) + mean((3,30), (7,70)) = (6, 60); position 5: (5, 50) + mean((4,40), (8,80)) = (11, 110).
    attn, hidden, keys = _visionzip_hand_inputs()
    result = ref.visionzip_compress(attn, hidden, keys, dominant=3, contextual=2)
    assert result.dominant_positions.tolist() == [0, 2, 6]
    assert result.target_positions.tolist() == [1, 5]
    expected = torch.tensor([[0, 0], [2, 20], [6, 60], [6, 60], [11, 110]], dtype=F64)
    torch.testing.assert_close(result.tokens, expected, rtol=0, atol=1e-12)


def test_visionzip_keys_per_head_are_averaged_and_heads_summed():
    attn, hidden, keys = _visionzip_hand_inputs()
    per_head = torch.stack([keys * 3, -keys])  # mean = keys
    a = ref.visionzip_compress(attn, hidden, per_head, 3, 2)
    b = ref.visionzip_compress(attn.sum(0), hidden, keys, 3, 2)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)


def test_visionzip_target_without_members():
    # contextual 3 of M = 6: step 2 -> targets at places 0, 2, 4 = positions 1, 4, 7; others 3, 5, 8.
    # unit keys: target 1 (1, 0), target 4 (.196, .981), target 7 (.894, .447).
    # position 3 (.949, .316): cosines .949, .496, .990 -> target 7; position 5 (0, 1): 0, .981, .447
    # -> target 4; position 8 (.0995, .995): .0995, .995, .534 -> target 4. Target 1 gets no member.
    attn, hidden, keys = _visionzip_hand_inputs()
    result = ref.visionzip_compress(attn, hidden, keys, 3, 3)
    assert result.target_positions.tolist() == [1, 4, 7]
    assert result.assignment.tolist() == [2, 1, 1]
    expected = torch.tensor([[1, 10], [4 + 6.5, 40 + 65], [7 + 3, 70 + 30]], dtype=F64)
    torch.testing.assert_close(result.tokens[3:], expected, rtol=0, atol=1e-12)


def test_visionzip_targets_are_the_first_of_a_strided_range():
    # dominant 2: [CLS] + patch 5 (position 6). Remaining [1, 2, 3, 4, 5, 7, 8] (M = 7), contextual 2:
    # step 3 -> arange(0, 7, 3) = [0, 3, 6], the first two -> positions 1 and 4.
    # position 2 (cos .995 / .293) -> 1, 3 (.949 / .496) -> 1, 5 (0 / .981) -> 4, 7 (.894 / .614) -> 1,
    # 8 (.0995 / .995) -> 4: (1, 10) + mean(2, 3, 7) * (1, 10) = (5, 50); (4, 40) + (6.5, 65).
    attn, hidden, keys = _visionzip_hand_inputs()
    result = ref.visionzip_compress(attn, hidden, keys, 2, 2)
    assert result.dominant_positions.tolist() == [0, 6]
    assert result.target_positions.tolist() == [1, 4]
    expected = torch.tensor([[0, 0], [6, 60], [5, 50], [10.5, 105]], dtype=F64)
    torch.testing.assert_close(result.tokens, expected, rtol=0, atol=1e-12)


def test_visionzip_official_failures_raise():
    attn, hidden, keys = _visionzip_hand_inputs()
    with pytest.raises(ValueError):
        ref.visionzip_compress(attn, hidden, keys, 3, 0)  # M // 0
    with pytest.raises(ValueError):
        ref.visionzip_compress(attn, hidden, keys, 3, 7)  # more slots than the 6 tokens left
    with pytest.raises(ValueError):
        ref.visionzip_compress(attn, hidden, keys, 0, 2)  # topk(-1)


def test_visionzip_splits_and_invariants():
    assert {k: sum(v) for k, v in ref.VISIONZIP_SPLITS.items()} == {64: 64, 128: 128, 192: 192}
    assert ref.VISIONZIP_MAIN_DEFAULT == (191, 30)
    torch.manual_seed(1)
    hidden = torch.randn(577, 8, dtype=F64)
    for budget, (dom, ctx) in ref.VISIONZIP_SPLITS.items():
        attn = torch.rand(16, 576, dtype=F64)
        result = ref.visionzip_compress(attn, hidden, torch.randn(16, 577, 4, dtype=F64), dom, ctx)
        assert result.tokens.shape == (budget, 8)
        pos = result.dominant_positions
        assert pos[0] == 0 and torch.equal(pos, pos.sort().values) and pos.unique().numel() == dom
        assert set((pos[1:] - 1).tolist()) == set(attn.sum(0).topk(dom - 1).indices.tolist())
        torch.testing.assert_close(result.tokens[:dom], hidden[pos], rtol=0, atol=0)


# ----------------------------------------------------------------------------- LLaVA-PruMerge+


def _prumerge_hand_inputs():
    # N = 36, C = 4, scale C ** -0.5 = 0.5, q[0] = (2, 0, 0, 0): logit_j = k_j[0].
    # Patch keys are multiples of u = (1, 0, 0, 0): cosine 1 among all of them, except patches
    # 1, 2, 3 with key -u (cosine -1). Logits: patch 6 -> 3.5, patch 20 -> 3.0, patches 1-3 -> -1,
    # the rest 1, [CLS] key 0 -> 0.
    n = 36
    q = torch.zeros(n + 1, 4, dtype=F64)
    q[0, 0] = 2.0
    k = torch.zeros(n + 1, 4, dtype=F64)
    k[1:, 0] = 1.0
    k[1 + 6, 0], k[1 + 20, 0] = 3.5, 3.0
    k[1 + 1 : 1 + 4, 0] = -1.0
    torch.manual_seed(7)
    feats = torch.randn(n, 4, dtype=F64)
    logits = torch.cat([torch.zeros(1, dtype=F64), k[1:, 0]])
    attn = torch.softmax(logits, 0)[1:]
    return q, k, feats, attn


def test_prumerge_outlier_share_hand():
    # 3 low, 31 equal, 2 high: Q1 = Q3 = the common value, IQR = 0, only the 2 high are above.
    _, _, _, attn = _prumerge_hand_inputs()
    assert ref.prumerge_outlier_share(attn) == 2 / 36
    # numpy's linear percentile: [0, 1, ..., 7] -> Q1 = 1.75, Q3 = 5.25, bound 10.5 -> 20 is the outlier
    assert ref.prumerge_outlier_share(torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 20])) == 1 / 8
    assert ref.prumerge_outlier_share(torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 10.5])) == 0.0  # strict '>'
    # the interpolation matters: with the lower neighbours (1 and 5) the bound would be 11
    assert ref.prumerge_outlier_share(torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 10.75])) == 1 / 8


def test_prumerge_plus_hand_case():
    # share 2/36: topk(2) = [6, 20] (6 first: larger); int(1 / share) = 18, step 6: samples
    # 0, 6, 12, 18, 24, 30 minus the taken 6 -> kept [6, 20, 0, 12, 18, 24, 30].
    # Each kept token has 35 candidates; the 32 with cosine 1 are exactly all patches but itself and
    # 1, 2, 3, so merged_i = x_i + sum over j not in {i, 1, 2, 3} of attn_j x_j.
    # Extra token = sum over the 29 non-kept patches of attn_j x_j.
    q, k, feats, attn = _prumerge_hand_inputs()
    result = ref.prumerge_plus(q, k, feats)
    assert result.share == 2 / 36
    assert result.kept.tolist() == [6, 20, 0, 12, 18, 24, 30]
    complement = [j for j in range(36) if j not in {6, 20, 0, 12, 18, 24, 30}]
    assert result.complement.tolist() == complement
    weighted = attn.unsqueeze(-1) * feats
    total = weighted.sum(0) - weighted[1:4].sum(0)
    expected = [feats[i] + total - weighted[i] for i in result.kept.tolist()]
    expected.append(weighted[complement].sum(0))
    torch.testing.assert_close(result.tokens, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_prumerge_plus_fixed_path_with_duplicate():
    # reduction_ratio 1/9: topk(4) and samples arange(4, 35, 9) = [4, 13, 22, 31], no de-duplication.
    # Put an attention outlier on 13: it is kept twice and the complement loses its smallest entry.
    q, k, feats, _ = _prumerge_hand_inputs()
    k[1 + 13, 0] = 4.0  # patch 13 now most attended; top-4 = [13, 6, 20, then a tie among the 1s]
    result = ref.prumerge_plus(q, k, feats, adaptive=False, reduction_ratio=1 / 9, tie_break="stable")
    assert result.kept.tolist() == [13, 6, 20, 0, 4, 13, 22, 31]
    non_kept = [j for j in range(36) if j not in {13, 6, 20, 0, 4, 22, 31}]
    assert result.complement.tolist() == non_kept[1:]  # one duplicate -> drop the smallest (1)
    assert result.tokens.shape == (9, 4)
    torch.testing.assert_close(result.tokens[0], result.tokens[5])  # both copies of 13 absorb the same set


def test_prumerge_plus_failures_raise():
    q, k, feats, _ = _prumerge_hand_inputs()
    flat_q = torch.zeros_like(q)  # uniform attention: no outlier, share 0 -> 1 / 0 officially
    with pytest.raises(ValueError, match="share is 0"):
        ref.prumerge_plus(flat_q, k, feats)
    with pytest.raises(ValueError, match="spatial samples"):
        ref.prumerge_plus(q, k, feats, adaptive=False, reduction_ratio=0.05)  # 1 topk vs 2 samples
    with pytest.raises(ValueError, match="candidates"):
        ref.prumerge_plus(q[:21], k[:21], feats[:20], adaptive=False, reduction_ratio=1 / 4)


def test_prumerge_plus_invariants_576():
    torch.manual_seed(3)
    q, k, feats = torch.randn(577, 16, dtype=F64), torch.randn(577, 16, dtype=F64), torch.randn(576, 16, dtype=F64)
    result = ref.prumerge_plus(q, k, feats)
    kept = result.kept.tolist()
    left = int(576 * result.share)
    assert len(set(kept)) == len(kept) and max(kept) <= 574  # arange stops before 575
    attn = torch.softmax(q @ k.T * 16**-0.5, -1)[0, 1:]
    assert kept[:left] == attn.topk(left).indices.tolist()  # descending attention first
    assert kept[left:] == sorted(kept[left:])  # then the spatial samples, ascending
    assert result.tokens.shape == (len(kept) + 1, 16)
    assert sorted(kept + result.complement.tolist()) == list(range(576))


# ----------------------------------------------------------------------------- PyramidDrop


def _pdrop_identity_args(hidden, h=1, hkv=1):
    d = hidden.shape[1]
    return {
        "norm_weight": torch.ones(d, dtype=hidden.dtype),
        "norm_eps": 1e-6,
        "wq": torch.eye(d, dtype=hidden.dtype).repeat(h, 1)[: d * h],
        "wk": torch.eye(d, dtype=hidden.dtype).repeat(hkv, 1)[: d * hkv],
        "num_heads": h,
        "num_kv_heads": hkv,
        "cos": torch.ones(64, d // h, dtype=hidden.dtype),
        "sin": torch.zeros(64, d // h, dtype=hidden.dtype),
    }


def test_pyramiddrop_hand_case():
    # d = 4, one head, identity projections, no rotation. Rows have RMS 1 after the norm, so
    # q_last . k_j = 4 cos(theta_j): image tokens at positions 2..7 with cosines
    # [0.9, 0.1, 0.5, -0.3, 0.7, 0.2]; keep 3 -> relative 0, 4, 2 -> positions sorted [2, 4, 6].
    rows = [[2, 0, 0, 0], [0, 0, 2, 0]]
    rows += [[2 * c, 2 * math.sqrt(1 - c * c), 0, 0] for c in [0.9, 0.1, 0.5, -0.3, 0.7, 0.2]]
    rows += [[0, 0, 0, 2], [2, 0, 0, 0]]  # text; the last one is the query (direction (1, 0, 0, 0))
    hidden = torch.tensor(rows, dtype=F64)
    kept = ref.pyramiddrop_rank(hidden, image_start=2, image_len=6, keep=3, **_pdrop_identity_args(hidden))
    assert kept.tolist() == [2, 4, 6]


def test_pyramiddrop_gqa_and_counts():
    torch.manual_seed(5)
    hidden = torch.randn(30, 8, dtype=F64)
    d, h = 8, 4
    angles = torch.arange(64.0, dtype=F64)[:, None] * torch.tensor([0.3, 0.3], dtype=F64)  # head_dim 2
    base = {
        "norm_weight": torch.ones(d, dtype=F64) * 1.3,
        "norm_eps": 1e-6,
        "num_heads": h,
        "cos": torch.cos(angles),
        "sin": torch.sin(angles),
    }
    wq, wk2 = torch.randn(d, d, dtype=F64), torch.randn(4, d, dtype=F64)  # 2 key heads of dim 2
    span = {"image_start": 3, "image_len": 20, "keep": 7}
    with pytest.raises(ValueError, match="repeat"):
        ref.pyramiddrop_rank(hidden, wq=wq, wk=wk2, num_kv_heads=2, **base, **span)
    # repeat_kv=True equals giving every query head its group's key weights explicitly
    a = ref.pyramiddrop_rank(hidden, wq=wq, wk=wk2, num_kv_heads=2, repeat_kv=True, **base, **span)
    wk4 = wk2.view(2, 2, d).repeat_interleave(2, dim=0).reshape(8, d)
    b = ref.pyramiddrop_rank(hidden, wq=wq, wk=wk4, num_kv_heads=4, **base, **span)
    assert a.tolist() == b.tolist() and len(a) == 7 and torch.equal(a, a.sort().values)
    # one key head broadcasts like a repeat (the official matmul works there)
    c = ref.pyramiddrop_rank(hidden, wq=wq, wk=wk2[:2], num_kv_heads=1, **base, **span)
    d4 = ref.pyramiddrop_rank(hidden, wq=wq, wk=wk2[:2].repeat(4, 1), num_kv_heads=4, **base, **span)
    assert c.tolist() == d4.tolist()
    assert all(3 <= p < 23 for p in a.tolist())
    assert ref.pyramiddrop_counts(576) == [576, 288, 144, 72]
    assert ref.pyramiddrop_counts(100) == [100, 50, 25, 12]


# ----------------------------------------------------------------------------- SparseVLM v1.5


def test_sparsevlm_keep_counts():
    assert ref.sparsevlm_keep_count(64, 2, 576) == 66
    assert ref.sparsevlm_keep_count(128, 6, 303) == 110
    assert ref.sparsevlm_keep_count(192, 15, 576) == 110
    assert ref.sparsevlm_keep_count(64, 2, 40) == 39  # min(table, n - 1)
    with pytest.raises(ValueError):
        ref.sparsevlm_keep_count(100, 2, 576)


def test_sparsevlm_text_raters_hand():
    # image rows all e0; text rows 3 e0, 0, e1, 2.5 e0 -> each image row's softmax over text is
    # softmax([3, 0, 0, 2.5]) = [.586, .029, .029, .355]; mean .25 -> raters 0 and 3.
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    embeds = torch.tensor([e1, e0, e0, e0, [3.0, 0.0], [0.0, 0.0], e1, [2.5, 0.0]], dtype=F64)
    assert ref.sparsevlm_text_raters(embeds, 1, 3).tolist() == [0, 3]
    with pytest.raises(ValueError):
        ref.sparsevlm_text_raters(embeds[:4], 1, 3)  # no text after the image


def test_sparsevlm_relation_hand():
    # one head, head_dim 1, q = 1, k_j = ln(w_j): causal softmax row r = w_j / W_r over j <= r.
    # w = [1, 2, 4, 1, 1, 2]; image at 1..3, raters (relative) [0, 1] -> rows 4 and 5;
    # W_4 = 9, W_5 = 11 -> relation_j = w_j (1/9 + 1/11) / 2 = w_j * 10/99 for w = 2, 4, 1.
    # Two identical heads: the head mean is the one-head value (a head sum would double it).
    w = torch.tensor([1.0, 2, 4, 1, 1, 2], dtype=F64)
    q = torch.ones(2, 6, 1, dtype=F64)
    k = torch.log(w).view(1, 6, 1).repeat(2, 1, 1)
    rel = ref.sparsevlm_relation(q, k, image_start=1, image_len=3, raters=torch.tensor([0, 1]))
    torch.testing.assert_close(rel, torch.tensor([20 / 99, 40 / 99, 10 / 99], dtype=F64), rtol=1e-12, atol=0)


def test_sparsevlm_dpc_knn_hand():
    # points 0, .1, .3, 5, 5.2, 5.25 (C = 1), 3 clusters (k = 3): densest p4, then p1;
    # delta: p4 5.25, p1 5.1, p5 .05, p0 .1, p3 .2, p2 .2 -> score top 3: p4, p1, p3.
    # members: p4 {4, 5}, p1 {0, 1, 2}, p3 {3}; merged = sum / (count + 1e-6).
    x = torch.tensor([[0.0], [0.1], [0.3], [5.0], [5.2], [5.25]], dtype=F64)
    merged = ref.sparsevlm_dpc_knn_merge(x, 3, torch.zeros(6, dtype=F64))
    expected = torch.tensor([[10.45 / (2 + 1e-6)], [0.4 / (3 + 1e-6)], [5.0 / (1 + 1e-6)]], dtype=F64)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)


def test_sparsevlm_noise_decides_tied_centres():
    # points 0, .5, 10, 10.5 (exact in binary), 2 clusters: all four densities equal exp(-.125).
    # noise on p2 -> p2 densest; deltas p0 10, p1 9.5, p3 .5 -> centres [p2, p0]: {2, 3}, {0, 1}.
    # noise on p0 -> deltas p1 .5, p2 10, p3 10.5 -> centres [p0, p3]: {0, 1}, {2, 3}.
    # no noise: every score ties; stable order takes p0, p1 and p2, p3 join p1.
    x = torch.tensor([[0.0], [0.5], [10.0], [10.5]], dtype=F64)
    a = ref.sparsevlm_dpc_knn_merge(x, 2, torch.tensor([0.0, 0, 1, 0], dtype=F64))
    torch.testing.assert_close(a, torch.tensor([[20.5 / (2 + 1e-6)], [0.5 / (2 + 1e-6)]], dtype=F64))
    b = ref.sparsevlm_dpc_knn_merge(x, 2, torch.tensor([1.0, 0, 0, 0], dtype=F64))
    torch.testing.assert_close(b, torch.tensor([[0.5 / (2 + 1e-6)], [20.5 / (2 + 1e-6)]], dtype=F64))
    c = ref.sparsevlm_dpc_knn_merge(x, 2, torch.zeros(4, dtype=F64), tie_break="stable")
    torch.testing.assert_close(c, torch.tensor([[0.0], [21.0 / (3 + 1e-6)]], dtype=F64))


def test_sparsevlm_prune_stage_hand():
    # 2 prefix tokens, 10 image tokens (positions 2..11), 3 text tokens; hidden row p = (p, -p).
    # relation ranks image token 7 > 2 > 9 > 4 > 0 > 5 > ...; keep 4 -> relative {2, 4, 7, 9}.
    # dropped 6 -> m = int(1.8) + 1 = 2 recycled: the best dropped, 0 then 5 (topk order);
    # one cluster (int(2 / 10) + 1): (positions 2 + 7) / (2 + 1e-6).
    hidden = torch.tensor([[p, -p] for p in range(15)], dtype=F64)
    relation = torch.tensor([0.5, 0.1, 0.8, 0.05, 0.6, 0.4, 0.2, 0.9, 0.3, 0.7], dtype=F64)
    stage = ref.sparsevlm_prune_stage(hidden, relation, image_start=2, keep=4, noise=torch.zeros(2, dtype=F64))
    assert stage.kept_positions.tolist() == [4, 6, 9, 11]
    assert stage.recycled_positions.tolist() == [2, 7]
    assert stage.image_len == 5
    merged = torch.tensor([[9 / (2 + 1e-6), -9 / (2 + 1e-6)]], dtype=F64)
    torch.testing.assert_close(stage.merged, merged)
    expected = torch.cat([hidden[[0, 1, 4, 6, 9, 11]], merged, hidden[12:]])
    torch.testing.assert_close(stage.hidden, expected)
    with pytest.raises(ValueError):
        ref.sparsevlm_prune_stage(hidden, relation, image_start=2, keep=10, noise=torch.zeros(1))


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_sparsevlm_three_stages_576(budget):
    # counts through the three stages with the official table: kept + int((int(.3 dropped) + 1) / 10) + 1
    torch.manual_seed(budget)
    image_len, seq = 576, torch.randn(5 + 576 + 7, 16, dtype=F64)
    expected_len = image_len
    for layer in ref.SPARSEVLM_LAYERS:
        keep = ref.sparsevlm_keep_count(budget, layer, image_len)
        relation = torch.rand(image_len, dtype=F64)
        m = int((image_len - keep) * 0.3) + 1
        stage = ref.sparsevlm_prune_stage(seq, relation, image_start=5, keep=keep, noise=torch.rand(m, dtype=F64))
        expected_len = keep + int(m / 10) + 1
        assert stage.image_len == expected_len and stage.hidden.shape[0] == 5 + expected_len + 7
        assert set((stage.kept_positions - 5).tolist()) == set(relation.topk(keep).indices.tolist())
        assert torch.equal(stage.kept_positions, stage.kept_positions.sort().values)
        assert not set(stage.recycled_positions.tolist()) & set(stage.kept_positions.tolist())
        seq, image_len = stage.hidden, stage.image_len
    assert image_len == {64: 18, 128: 39, 192: 113}[budget]
