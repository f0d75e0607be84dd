"""DivPrune (Alvar et al., CVPR 2025): before the language model, keep the k projected visual
features that are most diverse (greedy max-min cosine distance); no attention involved."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import DIVERSE, KEPT_DIVERSE, BeforeLLM, Selection, SpanView


@dataclass(frozen=True)
class DivPrune(BeforeLLM):
    name = "divprune"
    colour = "#CC79A7"
    roles = (replace(KEPT_DIVERSE, label="selected for diversity"),)

    def select(self, span: SpanView, k: int) -> Selection:
        from .. import ops  # at call time: the registry imports without torch (methods/__init__.py)

        kept = ops.max_min_diverse(span.hidden, k)
        return Selection(kept=kept, hidden=span.hidden[kept], roles=[DIVERSE] * kept.numel())
