"""The pure tensor functions of ASAP (paper section 4), testable without a model.

Shapes: B batch, H query heads, n tokens of one image span, D head dim, d hidden size.
Every score is computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-6  # the paper's epsilon, Eq. 3 and Eq. 4


def left_filled(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of each row (`keep`, (B, N)) as one (B, M) batch: their indices, in position
    order, and which are real. Kept tokens rank above dropped ones, each group in position order:
    the top M ranks of a row are its kept tokens and, for a row that keeps fewer than the longest,
    its last dropped slots as fillers; sorted by rank, the fillers come first (left padding)."""
    batch, length = keep.shape
    width = int(keep.sum(1).max())
    position = torch.arange(length, device=keep.device)
    rank = torch.where(keep, position + length, position).expand(batch, -1)
    top = rank.topk(width, dim=1)
    index = top.indices.gather(1, top.values.argsort(dim=1))
    return index, keep.gather(1, index)


def attention_mass(span_queries: torch.Tensor, span_keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eq. 2: s_j = sum_{i in I} q_i . k_j * scale, averaged over heads.

    span_queries (B, H, n, D) and span_keys (B, H, n, D), RoPE applied, key heads already repeated
    for GQA. Computed as (sum_i q_i) . k_j: O(n D) per head, never the n x n matrix. Returns (B, n).
    """
    query_sum = span_queries.float().sum(dim=2)
    return torch.einsum("bhd,bhnd->bhn", query_sum, span_keys.float()).mean(dim=1) * scaling


def min_max(scores: torch.Tensor) -> torch.Tensor:
    """Eq. 3: min-max normalisation over the last dimension (the image span)."""
    low = scores.amin(dim=-1, keepdim=True)
    high = scores.amax(dim=-1, keepdim=True)
    return (scores - low) / (high - low + EPS)


def sg_bimask(saliency: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """Eq. 4: the additive mask of one image span under SG-BiMask.

    saliency (B, n) is s_hat. Returns (B, n, n): 0 where query i >= key j, ln(max(lambda_j, eps))
    above the diagonal, with lambda_j = lambda_max * s_hat_j.
    """
    n = saliency.shape[-1]
    leak = torch.log(torch.clamp(lambda_max * saliency.float(), min=EPS))
    future = torch.ones(n, n, dtype=torch.bool, device=saliency.device).triu(diagonal=1)
    return torch.where(future, leak[:, None, :], torch.zeros((), device=saliency.device))


def received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    key_span: slice,
    value_norms: torch.Tensor | None = None,
    rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Attention probability each key of `key_span` receives, averaged over heads and query rows.

    queries (B, H, r, D), keys (B, H, kv, D) with heads repeated, mask (B, 1|H, r, kv) additive or
    None. The softmax runs over all keys (text included), as in the real forward pass; rows are
    processed in chunks so that scoring many rows never holds an r x kv x H tensor. With
    `value_norms` (B, H, n), the norm of each span key's value vector per head, each probability
    is weighted by it first: CAPA's attention contribution. Returns (B, n).
    """
    total = None
    keys = keys.float()
    for start in range(0, queries.shape[2], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        logits = torch.matmul(queries[:, :, rows].float(), keys.transpose(-1, -2)) * scaling
        if mask is not None:
            logits = logits + mask[:, :, rows].float()
        probs = torch.softmax(logits, dim=-1)[..., key_span]
        if value_norms is not None:
            probs = probs * value_norms[:, :, None, :].float()
        chunk_sum = probs.sum(dim=2).mean(dim=1)
        total = chunk_sum if total is None else total + chunk_sum
    return total / queries.shape[2]


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores of a 1-D tensor, in ascending (original) order."""
    return torch.topk(scores, k).indices.sort().values


def visit_order(saliency: torch.Tensor) -> torch.Tensor:
    """Descending saliency; ties go to the lower position first (a stable sort)."""
    return torch.sort(saliency, descending=True, stable=True).indices


def consolidation_groups(
    hidden: torch.Tensor, saliency: torch.Tensor, threshold: float, limit: int | None = None
) -> torch.Tensor:
    """The anchor of every kept token under salience-anchored routing (section 4.2).

    hidden (n, d) and saliency (n,) of the kept tokens, in position order. Tokens are visited by
    descending saliency; a token not yet absorbed becomes an anchor and absorbs every later-visited,
    unabsorbed token whose cosine similarity with it exceeds `threshold`. Returns anchor (n,) long:
    anchor[j] == j for anchors, else the index of the token that absorbed j. Source sets are
    disjoint and flow towards higher (or equal, earlier) saliency by construction.

    At most `limit` tokens are absorbed in all, since the refill can only replace as many as the
    pruned pool holds. The budget is spent anchor by anchor in visiting order: the most salient
    anchor absorbs its similar tokens first (in their visiting order), then the next anchor,
    until the budget is gone. With A, B, x, y visited in that order, A~y, B~x and limit 1, A
    absorbs y and x stays: merging flows to the most salient anchors first.
    """
    order = visit_order(saliency)
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    similar = ((unit @ unit.T) > threshold)[order][:, order].cpu().numpy()
    n = len(order)
    anchor_in_visit = np.arange(n)
    absorbed = np.zeros(n, dtype=bool)
    budget = n if limit is None else limit
    for i in range(n):  # n <= k, a few hundred: cheap next to one decoder layer
        if absorbed[i]:
            continue
        members = similar[i, i + 1 :] & ~absorbed[i + 1 :]
        members[np.flatnonzero(members)[budget:]] = False
        budget -= int(members.sum())
        absorbed[i + 1 :] |= members
        anchor_in_visit[i + 1 :][members] = i
    anchor = torch.empty(n, dtype=torch.long)
    order_cpu = order.cpu()
    anchor[order_cpu] = order_cpu[torch.from_numpy(anchor_in_visit)]
    return anchor.to(hidden.device)


def merge_states(hidden: torch.Tensor, saliency: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Eq. 6: each anchor becomes the saliency-weighted convex combination of itself and its sources.

    Returns (n, d) where anchors hold merged states and other rows are unchanged. A group whose
    weights are all zero falls back to the plain mean, so no state is ever divided by zero.
    """
    n = hidden.shape[0]
    weights = saliency.float()
    states = hidden.float()
    weighted_sum = torch.zeros_like(states).index_add_(0, anchor, weights[:, None] * states)
    weight_total = torch.zeros(n, device=hidden.device).index_add_(0, anchor, weights)
    plain_sum = torch.zeros_like(states).index_add_(0, anchor, states)
    count = torch.zeros(n, device=hidden.device).index_add_(0, anchor, torch.ones_like(weights))
    zero_weight = weight_total <= 0
    merged = torch.where(
        zero_weight[:, None],
        plain_sum / count.clamp(min=1)[:, None],
        weighted_sum / weight_total.clamp(min=torch.finfo(torch.float32).tiny)[:, None],
    )
    is_anchor = anchor == torch.arange(n, device=hidden.device)
    return torch.where(is_anchor[:, None], merged, states).to(hidden.dtype)


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy answer to the max-min diversity problem: k rows of `features` (n, d)
    whose smallest pairwise cosine distance is large. The first pick is the row farthest from
    its nearest neighbour; each next pick is the row farthest from everything picked so far.
    Returns the indices in ascending order."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.T
    n = distance.shape[0]
    nearest_other = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf"))
    picked = [int(nearest_other.amin(dim=1).argmax())]
    closest = distance[picked[0]].clone()  # each row's distance to its closest picked row
    closest[picked[0]] = float("-inf")
    while len(picked) < k:
        picked.append(int(closest.argmax()))
        closest = torch.minimum(closest, distance[picked[-1]])
        closest[picked[-1]] = float("-inf")
    return torch.tensor(sorted(picked), device=features.device)


def pooled_grid(features: torch.Tensor, side: int, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool a `side` x `side` grid of token features (side^2, d), row-major, down to
    `cells` x `cells`. Returns the pooled features (cells^2, d) and, for each cell, the index of
    the token at its top-left corner (where it sits in the sequence)."""
    grid = features.float().T.reshape(1, -1, side, side)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, cells).reshape(-1, cells * cells).T
    starts = [(i * side) // cells for i in range(cells)]  # adaptive pooling's cell boundaries
    corners = torch.tensor([row * side + col for row in starts for col in starts], device=features.device)
    return pooled.to(features.dtype), corners


def pooled_cells(side: int, cells: int) -> list[list[int]]:
    """The token indices (row-major on a `side` x `side` grid) that each cell of `pooled_grid`
    averages, cells in row-major order. Adaptive pooling's cells overlap by a row or a column
    where `side` is not a multiple of `cells`."""
    bounds = [((i * side) // cells, -(-(i + 1) * side // cells)) for i in range(cells)]
    return [
        [row * side + col for row in range(top, bottom) for col in range(left, right)]
        for top, bottom in bounds
        for left, right in bounds
    ]


def most_attended(attention: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` patches the [CLS] token attends to most, and the rest, both in rank order:
    `attention` (heads, n) is averaged over heads (in its dtype) and ranked by a descending argsort
    (ties as torch's sort leaves them)."""
    scores = attention.mean(dim=0) if attention.dim() == 2 else attention
    ranked = scores[None].argsort(dim=-1, descending=True)[0]
    return ranked[:count], ranked[count:]


def without_duplicates(features: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """`count` of the `candidates` (indices into `features` (n, c)) left by rounds of duplicate
    removal: the candidates at even places are matched with those at odd places by the cosine of
    their features, and the (at most 8) evens whose best match is closest are dropped, until
    `count` remain. The survivors come in the order of the rounds (evens by ascending best match,
    then the odds); an odd number of candidates keeps every even that is not dropped."""
    unit = features / features.norm(dim=-1, keepdim=True)
    while count > 0:
        drop = min(8, candidates.numel() - count)
        if drop <= 0:
            break
        tokens = unit[candidates][None]  # a leading batch of one, strided halves: the authors' rounding
        best_match = (tokens[:, 0::2] @ tokens[:, 1::2].transpose(-1, -2)).amax(dim=-1)
        distinct = best_match.argsort(dim=-1, descending=True)[0, drop:]
        candidates = torch.cat([candidates[0::2][distinct], candidates[1::2]])
    return candidates if count > 0 else candidates[:0]


def text_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters: the text tokens (rows of `text` (t, d), input embeddings) whose
    relevance to the image (`image` (n, d)) is above the mean relevance, where relevance is the
    softmax over the text of image . text, averaged over the image rows. Returns indices into
    `text`, ascending; every text row where none is above the mean (one text token: the authors'
    code would average an empty set)."""
    relevance = (image.float() @ text.float().T).softmax(dim=1).mean(dim=0)
    raters = torch.nonzero(relevance > relevance.mean()).flatten()
    return raters if raters.numel() else torch.arange(text.shape[0], device=text.device)


def dpc_knn_clusters(tokens: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of `tokens` (m, c) into `clusters` groups, as SparseVLM recycles its
    deleted tokens. Distances are Euclidean / sqrt(c); a token's density is exp(-mean squared
    distance to its `clusters` nearest, itself included) plus 1e-6 `noise` (m,) (which orders
    tied densities); its delta is the distance to the nearest denser token (the largest distance
    when none is denser). Centres: the top `clusters` of delta * density (torch.topk's order);
    each token joins its nearest centre (the first on ties), a centre itself. Returns the
    centres (clusters,) and each token's cluster (m,)."""
    points = tokens.float()
    dist = torch.cdist(points[None], points[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    dist = dist / points.shape[1] ** 0.5
    nearest = torch.topk(dist, k=clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.to(dist.dtype) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).amin(dim=-1)
    centres = torch.topk((delta * density)[None], clusters, dim=-1).indices[0]
    cluster = dist[centres].argmin(dim=0)
    cluster[centres] = torch.arange(clusters, device=tokens.device)
    return centres, cluster


def cluster_means(tokens: torch.Tensor, cluster: torch.Tensor, clusters: int) -> torch.Tensor:
    """Each cluster's members summed with weight 1 / (members + 1e-6): their mean, as SparseVLM
    merges (its 1e-6 kept). tokens (m, c), cluster (m,) in 0..clusters-1. Returns (clusters, c)."""
    points = tokens.float()
    members = torch.zeros(clusters, device=tokens.device).index_add_(
        0, cluster, torch.ones_like(cluster, dtype=points.dtype)
    )
    weight = 1 / (members + 1e-6)
    merged = torch.zeros(clusters, points.shape[1], device=tokens.device)
    return merged.index_add_(0, cluster, points * weight[cluster, None]).to(tokens.dtype)


def dominant_patches(attention: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's dominant patches: the `count` the [CLS] token attends to most, the attention
    (heads, n) summed over heads (a sum, as the authors') and ranked by torch.topk over a batch of
    one (ties as theirs); returned in patch order, with the rest in patch order."""
    scores = attention.sum(dim=0) if attention.dim() == 2 else attention
    chosen = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    chosen[torch.topk(scores[None], count, dim=-1).indices[0]] = True
    return chosen.nonzero().flatten(), (~chosen).nonzero().flatten()


def context_groups(keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual grouping of m tokens by their keys (m, d), in patch order: the
    targets are every (m // count)-th token (step at least 1), the first `count`; each other token
    joins the target whose key is most similar (cosine, the first target on ties). Returns the
    targets, the others (both indices into the m tokens, ascending) and each other's target (an
    index into the targets)."""
    unit = keys / keys.norm(dim=-1, keepdim=True)  # no epsilon, as theirs: keys are never zero
    m = keys.shape[0]
    targets = torch.arange(0, m, max(1, m // count), device=keys.device)[:count]
    is_target = torch.zeros(m, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    others = (~is_target).nonzero().flatten()
    similarity = torch.bmm(unit[others][None], unit[targets].T[None])[0]  # a batch of one: their rounding
    return targets, others, similarity.argmax(dim=-1)


def merge_into_targets(
    features: torch.Tensor, targets: torch.Tensor, others: torch.Tensor, assignment: torch.Tensor
) -> torch.Tensor:
    """VisionZip's contextual tokens: each target's feature plus the mean of the features of the
    tokens that joined it (nothing added where none did). features (m, c); returns (targets, c)."""
    count = targets.numel()
    total = torch.zeros(count, features.shape[-1], dtype=features.dtype, device=features.device)
    total.index_add_(0, assignment, features[others])
    members = torch.bincount(assignment, minlength=count).clamp(min=1).to(features.dtype)
    return features[targets] + total / members[:, None]


def cls_row_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s [CLS] attention: one head over the full width, softmax(q_cls k^T C^-0.5) over
    [CLS] and the n patches, in the input dtype as theirs; query and key (1 + n, C). Returns (n,)."""
    scores = (query[:1] @ key.transpose(0, 1)) * query.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1)[0, 1:]


def outlier_count(scores: torch.Tensor) -> int:
    """How many scores lie above Q3 + 1.5 IQR: numpy's percentiles of the float32 scores, as
    PruMerge+'s `outlier_dectection`."""
    values = scores.detach().to(torch.float32).cpu().numpy().ravel()
    low, high = np.percentile(values, 25), np.percentile(values, 75)
    return int((values > high + 1.5 * (high - low)).sum())


def budget_picks(scores: torch.Tensor, picks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge+'s fixed path for `picks` tokens: the ceil(picks / 2) most attended (torch.topk,
    best first) and picks // 2 spatial samples, every (n // samples)-th patch from half a step on,
    before the last patch (theirs: arange(step // 2, 575, step)); a sample may repeat a top token."""
    n = scores.shape[0]
    top = torch.topk(scores[None], (picks + 1) // 2, dim=-1).indices[0]
    count = picks // 2
    step = n // count if count else 1
    samples = torch.arange(step // 2, n - 1, step, device=scores.device)[:count]
    return top, samples


def adaptive_picks(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge+'s adaptive path: the share s of outliers (at least one: theirs divides by s),
    the int(n s) most attended (best first), then every int(int(1 / s) / 3)-th patch (at least 1)
    before the last one that is not among them."""
    n = scores.shape[0]
    share = max(outlier_count(scores), 1) / n
    top = torch.topk(scores[None], int(n * share), dim=-1).indices[0]
    step = max(1, int(int(1 / share) / 3))
    taken = torch.zeros(n, dtype=torch.bool, device=scores.device)
    taken[top] = True
    grid = torch.arange(0, n - 1, step, device=scores.device)
    return top, grid[~taken[grid]]


def left_out(picked: torch.Tensor, n: int) -> torch.Tensor:
    """The patches PruMerge+ merges into the extra token: those not picked, ascending, less as
    many of the first ones as `picked` has repeats (their complement_idx sorts a scattered
    range and drops the first len(picked) entries, repeats counted)."""
    taken = torch.zeros(n, dtype=torch.bool, device=picked.device)
    taken[picked] = True
    repeats = picked.numel() - int(taken.sum())
    return (~taken).nonzero().flatten()[repeats:]


def merge_neighbours(
    features: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, picked: torch.Tensor, rest: torch.Tensor
) -> tuple[torch.Tensor, list[list[int]]]:
    """PruMerge+'s merge: each picked token plus the score-weighted sum (unnormalised) of its 32
    nearest by key cosine among the other picked tokens and `rest` (fewer where fewer exist).
    Returns the merged features (picked, C) and, for each, the patches it took in."""
    unit = torch.nn.functional.normalize(keys, p=2, dim=-1)
    # Each picked token against every patch in one product (no gather per token), then its own
    # candidates in their order: the picked ones but itself, then the rest, as theirs.
    cosines = torch.bmm(unit[picked][:, None], unit.T[None].expand(picked.numel(), -1, -1))[:, 0]
    merged, near_patches = torch.empty_like(features[picked]), []
    for i in range(picked.numel()):
        candidates = torch.cat([picked[:i], picked[i + 1 :], rest])
        cosine = cosines[i, candidates][None]
        near = candidates[torch.topk(cosine, min(32, candidates.numel()), dim=-1).indices[0]]
        merged[i] = features[picked[i]] + (features[near] * scores[near, None]).sum(dim=0)
        near_patches.append(near.tolist())
    return merged, near_patches
