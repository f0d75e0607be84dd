"""FastV (Chen et al., ECCV 2024): causal attention from the last prompt token at layer L-1,
top-k, drop the rest."""

from __future__ import annotations

from dataclasses import dataclass

from .base import PruningMethod, Selection, SpanView


@dataclass(frozen=True)
class FastV(PruningMethod):
    name = "fastv"
    colour = "#0072B2"
    score_queries: str = "last"
    score: str = "attention"
    kv_cache: str = "exact"  # or "compact": layers 0..L-1 keep only the kept tokens once the prefill is done

    def select(self, span: SpanView, k: int) -> Selection:
        from .. import ops  # at call time: the registry imports without torch (methods/__init__.py)

        kept = ops.top_k(span.importance, k)
        return Selection(kept=kept, hidden=span.hidden[kept])
