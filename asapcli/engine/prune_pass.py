"""One pruning prefill as it goes: the image spans of a forward call's chunk, where their tokens
are as the layers go, the scores the attention function records for them, and each prune step,
which asks the span's method what to keep. What it did to each span comes out as a SpanRecord."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from . import attention, ops
from .methods import SpanScores, SpanView
from .plans import PruningPlan


@dataclass(frozen=True)
class SpanRecord:
    """What the decoder did to one image span of a prefill. `start`, `end` and `kept` (the
    positions that went on past the last pruning step, ascending) are positions of the span's
    batch row, its padding included (`shifted` counts them in the row's own tokens); `roles` says
    why each kept token was kept (engine.methods.ROLES) and `absorbed` which span indices (0: the
    span's first token) each one took the states of (ASAP's anchors, pool's cells); `importance`
    is the attention the span's tokens received when the method scored them at its first step,
    `merged` how many kept tokens were merged. `stages` holds (layer, positions kept from that
    layer on) for every step that pruned the span (one for single-layer methods; the last is
    `kept`). A span only scored (a score_only plan) has `kept` None."""

    start: int
    end: int
    kept: torch.Tensor | None
    roles: list[str] = field(default_factory=list)
    absorbed: list[list[int]] = field(default_factory=list)
    importance: torch.Tensor | None = None
    merged: int = 0
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def shifted(self, padding: int) -> SpanRecord:
        """The record counted in its row's own tokens, the `padding` before them left out."""
        kept = self.kept - padding if self.kept is not None else None
        stages = [(layer, positions - padding) for layer, positions in self.stages]
        return replace(self, start=self.start - padding, end=self.end - padding, kept=kept, stages=stages)

    def absorbed_positions(self) -> list[list[int]]:
        """`absorbed` as positions (counted as `start` is) rather than span indices."""
        return [[self.start + index for index in indices] for indices in self.absorbed]


@dataclass
class _Span:
    """One span of a pruning pass as the pass goes: its batch row, where its tokens are now in the
    call's tokens (`now`, chunk coordinates, fewer after each step), its steps (layer -> tokens
    left), which of its original tokens are still there (`index`, span indices ascending), and
    what its steps did so far."""

    row: int
    ordinal: int  # among the call's spans, row by row, left to right (the vision tower's order)
    start: int  # the span's original chunk coordinates
    end: int
    now: slice
    steps: dict[int, int | None]
    index: torch.Tensor
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    absorbed: list[list[int]] = field(default_factory=list)
    importance: torch.Tensor | None = None
    merged: int = 0


# The vision tower's cues of a call's image: (its span's ordinal among the call's spans, their count) -> cues.
Vision = Callable[[int, int], object]


class PrunePass:
    """The state of one pruning prefill over a batch (one plan per row): the spans inside this
    forward's chunk, where their tokens are now, the layers that prune them (`layers`, the union
    of their schedules' steps) and the scores recorded for each span before a step: by the
    attention of the layer before it, or by the stage's own layer (`stage_scores` methods).
    `records` holds, per row, a SpanRecord for each span pruned or scored, once the last step is
    done; `measured`, the layers whose attention function saw the pass (the decoder checks it)."""

    def __init__(
        self,
        plans: list[PruningPlan],
        chunk_start: int,
        chunk_len: int,
        attention_mask: torch.Tensor | None,
        vision: Vision | None = None,
    ):
        self.plans = plans
        self.attention_mask = attention_mask
        self.method = plans[0].method
        self.k = plans[0].k
        self.renumber = plans[0].renumber
        self.vision = vision
        self.items: list[_Span] = []
        self.span_count = sum(len(plan.spans) for plan in plans)
        ordinal = 0
        for row, plan in enumerate(plans):
            for start, end in plan.spans:
                if chunk_start <= start and end <= chunk_start + chunk_len:
                    steps = {plan.layer: None} if plan.score_only else dict(plan.steps(start, end))
                    if steps:
                        self._add(row, ordinal, start - chunk_start, end - chunk_start, steps)
                ordinal += 1
        self.layers = sorted({layer for item in self.items for layer in item.steps})
        self.layer = self.layers[0] if self.layers else plans[0].layer
        self.scores: dict[int, SpanScores] = {}  # by index into `spans`, for the next step
        self.raters: dict[int, torch.Tensor] = {}  # by index into `spans`: its rows, where the method rates so
        self.chunk = (chunk_start, chunk_len)
        self.records: list[list[SpanRecord]] = [[] for _ in plans]
        self.measured: set[int] = set()

    def _add(self, row: int, ordinal: int, start: int, end: int, steps: dict[int, int | None]) -> None:
        index = torch.arange(end - start)
        self.items.append(_Span(row, ordinal, start, end, slice(start, end), steps, index))

    def first_steps(self) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """Each span its steps pruned: (row, start, end, the layer of its first step, the chunk
        indices that step kept), in chunk coordinates: what a compact cache keeps of it in the
        layers before that step."""
        chunk_start = self.chunk[0]
        return [
            (item.row, item.start, item.end, item.stages[0][0], item.stages[0][1] - chunk_start)
            for item in self.items
            if item.stages
        ]

    @property
    def spans(self) -> list[tuple[int, slice]]:
        """Each span as (row, where its tokens are now in chunk coordinates)."""
        return [(item.row, item.now) for item in self.items]

    def rate(self, embeds: torch.Tensor) -> None:
        """Each span's text raters (score_queries "raters"), from the input embeddings `embeds`
        (B, N, d): among the tokens after the span that no image span of its row holds, those most
        relevant to the span (ops.text_raters); the chunk's last token where none follows."""
        chunk_start, chunk_len = self.chunk
        for index, item in enumerate(self.items):
            text = torch.ones(chunk_len, dtype=torch.bool)
            text[: item.end] = False
            for start, end in self.plans[item.row].spans:
                text[max(start - chunk_start, 0) : max(end - chunk_start, 0)] = False
            after = torch.nonzero(text).flatten().to(embeds.device)
            if after.numel() == 0:
                self.raters[index] = torch.tensor([chunk_len - 1], device=embeds.device)
                continue
            chosen = ops.text_raters(embeds[item.row, item.start : item.end], embeds[item.row, after])
            self.raters[index] = after[chosen]

    def query_rows(self, index: int, span: slice, q_len: int) -> slice | torch.Tensor:
        """The query rows (chunk coordinates, as they are now) whose attention ranks span `index`."""
        if index in self.raters:
            return self.raters[index]
        return attention.score_rows(self.method.score_queries, span, q_len)

    def record(self, index: int, scores: SpanScores) -> None:
        self.scores[index] = scores

    def scores_in(self, layer: int) -> bool:
        """Whether the attention of `layer` sees this pass (layers before the last step measure
        the spans; a method that scores with the stage's own layer needs none of them)."""
        return not self.method.stage_scores and layer < self.layers[-1]

    def scores_at(self, layer: int) -> bool:
        """Whether the attention of `layer` records the spans' scores: the layer before a step."""
        return layer + 1 in self.layers

    def prunes_before(self, layer: int) -> bool:
        return layer in self.layers

    def _unpadded(self, row: int, position: int) -> int:
        """A position of the padded batch, counted in its own row's tokens (padding left out)."""
        if self.attention_mask is None:
            return position
        return int(self.attention_mask[row, :position].sum())

    def prune(
        self, hidden: torch.Tensor, chunk_start: int, layer: int, real: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step before `layer`: select the tokens its spans keep from the states entering it
        (B, N, d). Returns, per row, the chunk indices that go on (B, M), ascending, the hidden
        states there (B, M, d), and which of them are real (B, M): rows that keep fewer than M
        tokens are left-filled with some of their dropped slots, masked out, as a padded batch
        is. `real`: which tokens are real now (a later step drops the fillers of the one before)."""
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if real is not None and layer != self.layers[0]:
            keep &= real
        hidden = hidden.clone()
        firsts = [
            self._select(index, item, hidden, keep, chunk_start, layer) if layer in item.steps else item.now.start
            for index, item in enumerate(self.items)
        ]
        kept_index, hidden, kept_real = _gather_kept(keep, hidden)
        self._moved(kept_index, keep, firsts)
        self.scores = {}
        if layer == self.layers[-1]:
            for item in self.items:
                self.records[item.row].append(self._span_record(item, chunk_start))
        return kept_index, hidden, kept_real

    def _select(
        self, index: int, item: _Span, hidden: torch.Tensor, keep: torch.Tensor, chunk_start: int, layer: int
    ) -> int:
        """One span's step: its kept tokens marked in `keep` and their states written into
        `hidden` (both in place, chunk coordinates); what it did noted in `item`. Returns where
        its first token that goes on is now."""
        scores = self.scores.get(index, SpanScores())
        if not item.stages and item.importance is None:
            item.importance = _first(scores.importance)
        if self.plans[item.row].score_only:
            return item.now.start
        view = SpanView(
            start=self._unpadded(item.row, item.start + chunk_start),
            hidden=hidden[item.row, item.now],
            importance=_first(scores.importance),
            mass=_first(scores.mass),
            saliency=_first(scores.saliency),
            vision=self.vision(item.ordinal, self.span_count) if self.vision is not None else None,
        )
        selection = self.method.select(view, item.steps[layer]).in_sequence(self.renumber)
        slots = selection.kept.sort().values + item.now.start  # in order, the tokens fill them
        keep[item.row, item.now] = False
        keep[item.row, slots] = True
        # clone: a step that keeps its whole span hands back the span's own states, a view of `hidden`
        hidden[item.row, slots] = selection.hidden.clone()
        item.absorbed = _absorbed(item, selection) if item.stages else selection.token_absorbed()
        item.index = item.index.to(selection.kept.device)[selection.kept]
        item.roles, item.merged = selection.token_roles(), item.merged + selection.merged
        item.stages.append((layer, (item.index + item.start + chunk_start).sort().values))
        return int(slots[0])

    def _moved(self, kept_index: torch.Tensor, keep: torch.Tensor, firsts: list[int]) -> None:
        """Where each span's tokens are after a step (`firsts`: where its first token that went on
        was before it), from the chunk indices that went on."""
        if len(self.layers) == 1:
            return  # no step after this one
        new_position = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
        order = torch.arange(kept_index.shape[1], device=keep.device).expand_as(kept_index)
        new_position.scatter_(1, kept_index, order)
        for item, first in zip(self.items, firsts):
            now = int(new_position[item.row, first])
            item.now = slice(now, now + item.index.numel())
        for index, rows in self.raters.items():  # text goes on; a rater cut with a span: the last token
            moved = new_position[self.items[index].row, rows]
            self.raters[index] = torch.where(moved >= 0, moved, kept_index.shape[1] - 1)

    def _span_record(self, item: _Span, chunk_start: int) -> SpanRecord:
        start, end = item.start + chunk_start, item.end + chunk_start
        if self.plans[item.row].score_only:
            return SpanRecord(start, end, None, importance=item.importance)
        ascending = item.index.argsort().tolist()  # the tokens' own places, where a method reordered them
        roles, absorbed = [item.roles[i] for i in ascending], [item.absorbed[i] for i in ascending]
        kept = item.stages[-1][1]
        return SpanRecord(start, end, kept, roles, absorbed, item.importance, item.merged, item.stages)


def _absorbed(item: _Span, selection) -> list[list[int]]:
    """The original span indices each kept token carries after a later step: those it and the
    tokens it absorbed now carried before."""
    earlier = item.absorbed or [[] for _ in range(item.index.numel())]
    original = item.index.tolist()
    return [
        sorted({*earlier[i], *(original[j] for j in sources), *(a for j in sources for a in earlier[j])})
        for i, sources in zip(selection.kept.tolist(), selection.token_absorbed())
    ]


def _gather_kept(keep: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept tokens of each row (`keep`, (B, N)) as one left-filled (B, M) batch
    (ops.left_filled): their indices, states and which are real."""
    index, real = ops.left_filled(keep)
    return index, hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), real


def _first(scores: torch.Tensor | None) -> torch.Tensor | None:
    return None if scores is None else scores[0]
