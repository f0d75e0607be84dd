"""SparseVLM v1.5 (Zhang et al., ICML 2025): the image tokens are pruned inside the language model
at three layers (2, 6 and 15 of 32), each ranking them by the attention that the layer pays them
from the text raters (the text tokens most relevant to the image in the input embeddings). Of the
tokens a stage deletes, the best rated 30% are clustered (DPC-kNN) and their cluster means are
recycled: they go on right after the kept image tokens, as image tokens. docs/method.md says how
-k maps to the counts and what was read where the authors' code is ambiguous."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import BY_SCORE, PruningMethod, Role, Selection, SpanView

RECYCLED = "recycled"
RECYCLED_CLUSTER = Role(RECYCLED, "recycled: a cluster of deleted tokens", "#44AA99")

RATED_LAYERS, DEPTH = (2, 6, 15), 32  # score.py 5: the layers whose attention rates, of 32
# score.py 7-15: image tokens each stage keeps (its clusters not counted), by budget.
TABLE = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
TABLE_TOKENS = 576  # the table was set for LLaVA-1.5's 576 tokens
BUDGET, TABLE_COUNTS = "budget", "table"


def recycled_count(deleted: int) -> int:
    """The deleted tokens sent to clustering: the authors' int(0.3 d) + 1."""
    return int(deleted * 0.3) + 1


def cluster_count(recycled: int) -> int:
    """The clusters they form: the authors' int(m / 10) + 1."""
    return int(recycled / 10) + 1


def left_after(tokens: int, keep: int) -> int:
    """The image tokens a stage leaves when it keeps `keep` of `tokens`: the kept ones and the
    clusters of the deleted ones."""
    return keep + cluster_count(recycled_count(tokens - keep))


def keep_for(tokens: int, left: int) -> int:
    """The fewest tokens a stage keeps by rank so as to leave `left` of `tokens` (left_after grows
    with keep, by steps of 0 or 1)."""
    low, high = 0, tokens - 1
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if left_after(tokens, middle) < left else (low, middle)
    return low


def rated_layers(depth: int) -> list[int]:
    """The layers whose attention rates the tokens: 2, 6, 15 of 32 scaled to `depth` (rounded half
    up), each after the one before and at most depth - 2 (a later layer must see the cut)."""
    layers: list[int] = []
    for layer in RATED_LAYERS:
        at = max(int(layer * depth / DEPTH + 0.5), layers[-1] + 1 if layers else 0)
        if at <= depth - 2:
            layers.append(at)
    return layers


def steps_for(tokens: int, keeps: list[int], layers: list[int]) -> list[tuple[int, int]]:
    """The schedule of stages keeping `keeps` by rank (each at most all but one of the tokens left,
    as score.py 35) before `layers`; a stage that would leave as many as it found is left out."""
    steps, left = [], tokens
    for layer, keep in zip(layers, keeps):
        after = left_after(left, min(keep, left - 1))
        if after < left:
            steps.append((layer, after))
            left = after
    return steps


def mean_tokens(tokens: int, steps: list[tuple[int, int]], depth: int) -> float:
    """The image tokens a layer holds, averaged over the `depth` layers."""
    bounds = [(0, tokens), *steps]
    ends = [layer for layer, _ in steps] + [depth]
    return sum((end - start) * count for (start, count), end in zip(bounds, ends)) / depth


def matched_steps(tokens: int, k: int, depth: int) -> list[tuple[int, int]]:
    """The budget-matched schedule: the table's row for the nearest budget (k as a share of 576),
    scaled by one factor, the largest whose stages average k image tokens per layer at most
    (clusters counted); the fewest the stages can keep where none reaches k."""
    row = TABLE[min(TABLE, key=lambda budget: (abs(budget - k * TABLE_TOKENS / tokens), budget))]
    layers = [layer + 1 for layer in rated_layers(depth)]

    def steps(scale: float) -> list[tuple[int, int]]:
        return steps_for(tokens, [max(1, int(scale * count)) for count in row], layers)

    low, high = 0.0, float(tokens)
    for _ in range(60):  # the mean grows with the scale
        middle = (low + high) / 2
        low, high = (middle, high) if mean_tokens(tokens, steps(middle), depth) <= k else (low, middle)
    return steps(low)


@dataclass(frozen=True)
class SparseVLM(PruningMethod):
    name = "sparsevlm"
    colour = "#882255"
    min_layer = 0  # it never reads L: its stages follow the model's depth
    reads_layer = False
    score_queries = "raters"
    roles = (replace(BY_SCORE, label="kept by the text raters' attention"), RECYCLED_CLUSTER)
    positions: str = "original"  # or "renumber": numbered afresh after each stage (the authors' code)
    stage_counts: str = BUDGET  # or "table": the authors' counts for k = 64, 128, 192
    seed: int = 0  # the density noise of the clustering (the authors' torch.rand)
    kv_cache: str = "exact"  # or "compact": layers before the first stage keep only what it kept, once prefilled

    def k_rule(self) -> str | None:
        return (
            "sparsevlm's k is the mean its stages keep over the layers, clusters included (or its table's counts); "
            "its last stage keeps fewer, far fewer on a shallow model"
        )

    def stage_layers(self, layer: int, num_layers: int | None) -> list[int]:
        """The layers after the rating ones: the authors prune the rating layer's output."""
        return [rated + 1 for rated in rated_layers(num_layers or DEPTH)]

    def budget_problem(self, k: int) -> str | None:
        if self.stage_counts == TABLE_COUNTS and k not in TABLE:
            return f"--stage-counts table needs -k {', '.join(map(str, TABLE))} (the authors' table), got {k}"
        return None

    def schedule(self, tokens: int, k: int, layer: int, num_layers: int | None) -> list[tuple[int, int]]:
        """The authors' table (at the scaled layers), or the budget-matched counts; nothing to
        prune where k keeps every token (budget)."""
        depth = num_layers or DEPTH
        if self.stage_counts == TABLE_COUNTS:
            return steps_for(tokens, list(TABLE[k]), self.stage_layers(layer, depth))
        return [] if k >= tokens else matched_steps(tokens, k, depth)

    def select(self, span: SpanView, k: int) -> Selection:
        """Keep the best rated, cluster the best rated 30% of the rest; each cluster takes its
        centre's slot and goes, renumbered, after the kept ones (the authors' order)."""
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        from .. import ops

        tokens, relation = span.hidden.shape[0], span.importance
        chosen = torch.topk(relation[None], keep_for(tokens, k), dim=-1).indices[0]
        is_kept = torch.zeros(tokens, dtype=torch.bool, device=relation.device)
        is_kept[chosen] = True
        kept, deleted = torch.nonzero(is_kept).flatten(), torch.nonzero(~is_kept).flatten()
        best = torch.topk(relation[deleted][None], recycled_count(deleted.numel()), dim=-1).indices[0]
        recycled = deleted[best]
        clusters = cluster_count(recycled.numel())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + span.start)  # as random's
        noise = torch.rand(recycled.numel(), generator=generator).to(relation.device)
        centres, cluster = ops.dpc_knn_clusters(span.hidden[recycled], clusters, noise)
        merged = ops.cluster_means(span.hidden[recycled], cluster, clusters)
        return _placed(span, kept, recycled, centres, cluster, merged)


def _placed(span: SpanView, kept, recycled, centres, cluster, merged) -> Selection:
    """The kept tokens in their slots and each cluster in its centre's slot, ascending; `order`
    puts the kept ones first, then the clusters in the centres' order."""
    import torch

    slots = torch.cat([kept, recycled[centres]])
    hidden = torch.cat([span.hidden[kept], merged.to(span.hidden.dtype)])
    ascending = slots.argsort()
    roles = [BY_SCORE.name] * kept.numel() + [RECYCLED] * centres.numel()
    members = [
        [int(recycled[j]) for j in torch.nonzero(cluster == c).flatten() if j != centre]
        for c, centre in enumerate(centres.tolist())
    ]
    absorbed = [[] for _ in range(kept.numel())] + members
    places = ascending.argsort()  # where each token of `slots` sits among the ascending ones
    return Selection(
        kept=slots[ascending],
        hidden=hidden[ascending],
        merged=centres.numel(),
        roles=[roles[i] for i in ascending.tolist()],
        absorbed=[absorbed[i] for i in ascending.tolist()],
        order=places,
    )
