"""No pruning: the reference every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from .base import PruningMethod, Selection, SpanView


@dataclass(frozen=True)
class Vanilla(PruningMethod):
    name = "vanilla"
    colour = "#444444"
    prunes = False
    reads_layer = False
    roles = ()  # every span is kept whole (base.UNPRUNED)

    def select(self, span: SpanView, k: int) -> Selection:
        raise AssertionError("vanilla never prunes")
