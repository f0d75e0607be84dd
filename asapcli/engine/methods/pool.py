"""Spatial average pooling: before the language model, the image's grid of projected features
is pooled down to the largest square grid of at most k cells. Plain downsampling, the baseline
a pruning method has to beat."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import UsageError
from .base import BeforeLLM, Role, Selection, SpanView

POOLED = "pooled"  # the average of one cell of the grid
POOLED_CELL = Role(POOLED, "pooled cell", "#CC79A7")


@dataclass(frozen=True)
class Pool(BeforeLLM):
    name = "pool"

    def k_rule(self) -> str | None:
        return "pool keeps the largest square grid of at most k tokens"

    colour = "#8C564B"
    roles = (POOLED_CELL,)

    def kept_count(self, tokens: int, k: int) -> int:
        return min(math.isqrt(k), _side(tokens)) ** 2

    def select(self, span: SpanView, k: int) -> Selection:
        from .. import ops  # at call time: the registry imports without torch (methods/__init__.py)

        side = _side(span.hidden.shape[0])
        cells = math.isqrt(k)
        pooled, corners = ops.pooled_grid(span.hidden, side, cells)
        members = ops.pooled_cells(side, cells)
        absorbed = [[index for index in cell if index != corner] for cell, corner in zip(members, corners.tolist())]
        return Selection(kept=corners, hidden=pooled, roles=[POOLED] * len(members), absorbed=absorbed)


def _side(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UsageError(
            f"pool needs the image span to be one square grid of patches; this one has {tokens} tokens "
            "(a tiling model such as LLaVA-NeXT?)"
        )
    return side
