"""Seeded uniform choice of k tokens: the floor any scoring method must beat."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import BY_SCORE, PruningMethod, Selection, SpanView


@dataclass(frozen=True)
class Random(PruningMethod):
    name = "random"
    colour = "#999999"
    roles = (replace(BY_SCORE, label="chosen at random"),)
    seed: int = 0
    kv_cache: str = "exact"  # or "compact": layers 0..L-1 keep only the kept tokens once the prefill is done

    def select(self, span: SpanView, k: int) -> Selection:
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        # Seeded per span so that two images of one prompt do not get the same pattern.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + span.start)
        kept = torch.randperm(span.hidden.shape[0], generator=generator)[:k].sort().values
        kept = kept.to(span.hidden.device)
        return Selection(kept=kept, hidden=span.hidden[kept])
