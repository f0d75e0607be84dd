"""ASAP (arXiv 2603.14549): SG-BiMask selection, saliency-weighted consolidation, budget
reallocation. The README's "What ASAP does here" says how each step is read."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BY_SCORE, SELECTED, PruningMethod, Role, Selection, SpanView

ANCHOR = "anchor"  # a selected token that absorbed similar selected ones (Eq. 6)
REFILLED = "refilled"  # taken from the pruned pool into a slot an absorbed token freed
MERGE_ANCHOR = Role(ANCHOR, "merge anchor", "#E69F00")
REFILL = Role(REFILLED, "refilled from the pruned pool", "#009E73")


@dataclass(frozen=True)
class AsapBimaskOnly(PruningMethod):
    """The ablation between FastV and ASAP: SG-BiMask in layers 0..L-1 and its top-k selection,
    no consolidation or refill.

    SG-BiMask only opens image queries to later image keys. With `last` or `text` score queries
    the scoring rows are text, causal under either mask, so the mask reaches the selection only
    through the hidden states that layers 0..L-2 computed under it: at L = 1 the kept set is
    exactly FastV's (the kept tokens still carry states that layer 0 computed under SG-BiMask).
    From L = 2 on, and with `all` queries at any L, the selections differ."""

    name = "asap-bimask-only"
    colour = "#56B4E9"
    sg_bimask = True
    needs_mass = True
    paired_with = "fastv"  # the same scoring under the causal mask: what SG-BiMask changes
    score_queries: str = "last"
    score: str = "attention"
    lambda_max: float = 1.0
    kv_cache: str = "exact"  # or "compact": layers 0..L-1 keep only the kept tokens once the prefill is done

    def select(self, span: SpanView, k: int) -> Selection:
        from .. import ops  # at call time: the registry imports without torch (methods/__init__.py)

        kept = ops.top_k(span.importance, k)
        return Selection(kept=kept, hidden=span.hidden[kept])


@dataclass(frozen=True)
class Asap(AsapBimaskOnly):
    """SG-BiMask selection, then consolidation of similar kept tokens and the refill of the
    slots they free (Eq. 6 and budget reallocation)."""

    name = "asap"
    colour = "#009E73"
    roles = (BY_SCORE, MERGE_ANCHOR, REFILL)
    merge_threshold: float = 0.9

    def select(self, span: SpanView, k: int) -> Selection:
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        from .. import ops

        selected = ops.top_k(span.importance, k)
        hidden = span.hidden[selected]
        pool_size = span.hidden.shape[0] - k
        anchor = ops.consolidation_groups(hidden, span.saliency[selected], self.merge_threshold, limit=pool_size)
        merged_hidden = ops.merge_states(hidden, span.saliency[selected], anchor)
        is_anchor = anchor == torch.arange(k, device=anchor.device)
        survivors, survivor_hidden = selected[is_anchor], merged_hidden[is_anchor]

        # Budget reallocation: refill the absorbed slots from the pruned pool by raw mass s.
        absorbed = k - survivors.numel()
        pool = torch.ones(span.hidden.shape[0], dtype=torch.bool, device=selected.device)
        pool[selected] = False
        pool_index = pool.nonzero().squeeze(1)
        refill = pool_index[torch.topk(span.mass[pool_index], absorbed).indices]

        kept = torch.cat([survivors, refill])
        states = torch.cat([survivor_hidden, span.hidden[refill]])
        order = kept.argsort()
        roles, sources = _roles(selected.tolist(), anchor.tolist(), absorbed)
        return Selection(
            kept=kept[order],
            hidden=states[order],
            merged=absorbed,
            roles=[roles[i] for i in order.tolist()],
            absorbed=[sources[i] for i in order.tolist()],
        )


def _roles(selected: list[int], anchor: list[int], refilled: int) -> tuple[list[str], list[list[int]]]:
    """Each kept token's role and the span indices it absorbed, in `select`'s order before sorting:
    the survivors of consolidation (an anchor that absorbed none is plainly selected), then the
    refills. `anchor` is consolidation_groups' answer over `selected`."""
    absorbed_by = {i: [] for i, a in enumerate(anchor) if a == i}
    for i, a in enumerate(anchor):
        if a != i:
            absorbed_by[a].append(selected[i])
    sources = list(absorbed_by.values())  # dicts keep insertion order: the survivors' ascending order
    roles = [ANCHOR if absorbed else SELECTED for absorbed in sources]
    return roles + [REFILLED] * refilled, sources + [[] for _ in range(refilled)]
