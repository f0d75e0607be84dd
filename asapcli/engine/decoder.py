"""The language model's layer loop, driven by the project so that visual tokens can be pruned.

`PrunedDecoder` wraps the LVLM's own text decoder (`model.get_decoder()`) and is installed with
the public `model.set_decoder`. The LVLM keeps doing everything else itself: vision tower,
projector, placing image features, the LM head, `generate()` with its sampling, streaming and
KV cache. We chose this over an own prefill/decode loop because each model family's
multimodal preprocessing (LLaVA-NeXT tiles and newlines, Qwen's 3-D positions) stays the
model's own code, untouched.

The decoder receives its plans in one of two ways (generate() rejects keyword arguments its
model's forward does not name, so a plan cannot travel as one): `with decoder.pruning(plan):`
prunes every forward call inside the block by one plan (tests, measurements), and
`decoder.prune_next(plans)` gives the next forward call alone its plans (the API's block plans
each call from its own input_ids, which the LVLM never hands its decoder). A plan names image
spans in absolute positions of the conversation, so it is inert during decoding steps and
earlier turns, and a chat turn that brings a new image prunes only that image's span in its own
prefill. What the decoder did to each span it pruned goes into the plan as one `SpanRecord`.

A plan prunes each span by its method's schedule: steps (layer, tokens left), one for the
single-layer methods, several for multi-stage ones (PyramidDrop), each pruning what the step
before left. After layer L-1 the sequence shrinks to text + k visual tokens per span; the kept tokens keep
their ORIGINAL position ids, so RoPE is unchanged for them. The DynamicCache then holds all
tokens in layers < L and the pruned sequence in layers >= L; layer 0 is never pruned, so its
length (`get_seq_length()`) stays the true position of the next token, which a chat's later
turns rely on. Methods that prune before the language model (`before_llm`, L = 0) prune
layer 0 too: single prompts decode fine (generate() numbers the steps from the attention
mask), chat refuses them.

A batch takes one plan per row (left-padded, as generate() pads). Rows may keep different
numbers of tokens (LLaVA-NeXT tiles differ per image): the shorter rows are left-filled with
some of their dropped slots, and the pruned layers get their own padding mask that marks those
and the batch padding, kept for the decoding steps of the same call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import AsapError
from . import attention, ops
from .methods import PruningMethod, SpanScores, SpanView


class UnsupportedModel(AsapError):
    """The model is built in a way the pruning engine cannot drive (yet)."""


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
class PruningPlan:
    """What to prune in the next prefill: `spans` are [start, end) positions of image tokens in the
    whole token sequence. `layer` is L, the first layer that sees pruned spans: layers 0..L-1 see
    every token. Each span is pruned by the method's schedule (`steps`: one step at L for the
    single-layer methods, several for multi-stage ones, whose layers depend on the model's
    `num_layers`). A span the method would not shrink at budget k (k >= its tokens) runs exactly
    as vanilla: no SG-BiMask, no scoring, unless `score_only` asks for the scores (attention
    figures). `renumber` numbers the tokens left after each step afresh, as a pipeline that feeds
    the next layers fewer embeddings does (official DivPrune, PyramidDrop). The decoder appends to
    `records` one SpanRecord per span it pruned or scored, in the order of `spans` (outputs, for
    reports and figures)."""

    method: PruningMethod
    k: int
    layer: int
    spans: list[tuple[int, int]]
    records: list[SpanRecord] = field(default_factory=list)
    score_only: bool = False  # score every span at its first step as the method would, prune none
    renumber: bool = False  # kept tokens take positions 0..M-1 (a shorter prompt) instead of their own
    num_layers: int | None = None  # the model's decoder layers, where a multi-stage schedule needs them
    vision: Callable[[int], object] | None = None  # a span's start -> what the vision tower gave for its image

    @property
    def pruned(self) -> list[SpanRecord]:
        """The records of the spans that lost tokens (a score-only span lost none)."""
        return [record for record in self.records if record.kept is not None]

    @property
    def merged(self) -> int:
        return sum(record.merged for record in self.records)

    def steps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The method's schedule for the span [start, end): (layer, tokens left from it on); once
        the span is pruned, the steps as they went (a method whose count is the image's own,
        PruMerge+'s adaptive one, may keep another number than k)."""
        if not self.method.prunes:
            return []
        done = next((r for r in self.records if r.start == start and r.kept is not None and r.stages), None)
        if done is None:
            return self.method.schedule(end - start, self.k, self.layer, self.num_layers)
        went, left = [], end - start
        for layer, positions in done.stages:  # less any step that kept all it was given (VisPruner's
            if positions.numel() < left:  # tiles and newlines can add up to the whole span)
                went.append((layer, positions.numel()))
                left = positions.numel()
        return went

    def shrinks(self, start: int, end: int) -> bool:
        """Whether the span [start, end) loses tokens at this budget; one that does not runs as vanilla
        (as every span does under vanilla, whatever its k)."""
        return bool(self.steps(start, end))


def checked_plans(plan: PruningPlan | list[PruningPlan] | None) -> list[PruningPlan] | None:
    """One plan per row of a batch (a single plan: a batch of one); they must agree on how they
    prune, each row naming its own spans."""
    plans = [plan] if isinstance(plan, PruningPlan) else plan
    if plans and len({(p.method, p.k, p.layer, p.num_layers) for p in plans}) != 1:
        raise ValueError("the plans of one batch must share method, k and layer")
    return plans


@dataclass
class _Span:
    """One span of a pruning pass as the pass goes: its batch row, where its tokens are now in the
    call's tokens (`now`, chunk coordinates, fewer after each step), its steps (layer -> tokens
    left), which of its original tokens are still there (`index`, span indices ascending), and
    what its steps did so far."""

    row: int
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


class PrunePass:
    """The state of one pruning prefill over a batch (one plan per row): the spans inside this
    forward's chunk, where their tokens are now, the layers that prune them (`layers`, the union
    of their schedules' steps) and the scores recorded for each span before a step: by the
    attention of the layer before it, or by the stage's own layer (`stage_scores` methods)."""

    def __init__(self, plans: list[PruningPlan], chunk_start: int, chunk_len: int, attention_mask: torch.Tensor | None):
        self.plans = plans
        self.attention_mask = attention_mask
        self.method = plans[0].method
        self.k = plans[0].k
        self.renumber = plans[0].renumber
        self.items: list[_Span] = []
        for row, plan in enumerate(plans):
            for start, end in plan.spans:
                if chunk_start <= start and end <= chunk_start + chunk_len:
                    steps = {plan.layer: None} if plan.score_only else dict(plan.steps(start, end))
                    if steps:
                        self._add(row, start - chunk_start, end - chunk_start, steps)
        self.layers = sorted({layer for item in self.items for layer in item.steps})
        self.layer = self.layers[0] if self.layers else plans[0].layer
        self.scores: dict[int, SpanScores] = {}  # by index into `spans`, for the next step
        self.raters: dict[int, torch.Tensor] = {}  # by index into `spans`: its rows, where the method rates so
        self.chunk = (chunk_start, chunk_len)

    def _add(self, row: int, start: int, end: int, steps: dict[int, int | None]) -> None:
        index = torch.arange(end - start)
        self.items.append(_Span(row, start, end, slice(start, end), steps, index))

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
                self.plans[item.row].records.append(self._span_record(item, chunk_start))
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
            vision=self._vision(item, chunk_start),
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

    def _vision(self, item: _Span, chunk_start: int):
        """What the vision tower gave for the span's image, where the plan can tell."""
        vision = self.plans[item.row].vision
        return vision(item.start + chunk_start) if vision is not None else None

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
    """The kept tokens of each row (`keep`, (B, N)) as one (B, M) batch: their indices, states and
    which are real. Kept tokens rank above dropped ones, each group in position order: the top M
    ranks of a row are its kept tokens and, for a row that keeps fewer than the longest, its last
    dropped slots as fillers; sorted by rank, the fillers come first."""
    batch, length = keep.shape
    width = int(keep.sum(1).max())
    position = torch.arange(length, device=keep.device)
    rank = torch.where(keep, position + length, position).expand(batch, -1)
    top = rank.topk(width, dim=1)
    index = top.indices.gather(1, top.values.argsort(dim=1))
    real = keep.gather(1, index)
    return index, hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), real


def _split_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positions for the rotary embedding, positions handed to the layers). Qwen-VL models
    give (4, B, N): text positions, then the three M-RoPE axes (time, height, width); (3, B, N)
    is M-RoPE alone. Pruning gathers all of them at the kept tokens, so a kept token keeps
    its original 3-D position, and decoding goes on from the model's own rope deltas."""
    if position_ids.ndim == 3 and position_ids.shape[0] == 4:
        return position_ids[1:], position_ids[0]
    if position_ids.ndim == 3:
        return position_ids, None
    return position_ids, position_ids


def _gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions (B, N) or (axes, B, N) at the kept chunk indices `index` (B, M), per row."""
    if positions.ndim == 3:
        return positions.expand(-1, index.shape[0], -1).gather(2, index[None].expand(positions.shape[0], -1, -1))
    return positions.expand(index.shape[0], -1).gather(1, index)


def _first(scores: torch.Tensor | None) -> torch.Tensor | None:
    return None if scores is None else scores[0]


@dataclass
class _AfterPruning:
    """What pruning prefills leave for the later calls on the same cache (the decoding steps of
    one generate(), a chat's later turns), per pruning step: `padding[layer]` says which tokens of
    the cache of the layers from `layer` on (to the next step's layer) are real, (B, cached), None
    where all are; `shift[layer]` (B,) how far a renumbered row's positions in those layers run
    behind the ones generate() counts from the whole prompt."""

    padding: dict[int, torch.Tensor | None] = field(default_factory=dict)
    shift: dict[int, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def _step(steps: dict, layer: int) -> int | None:
        """The layer of the last step at or before `layer` among `steps`; None: none."""
        return max((at for at in steps if at <= layer), default=None)

    def shift_at(self, layer: int, shifts: dict | None = None) -> torch.Tensor | None:
        step = self._step(self.shift if shifts is None else shifts, layer)
        return None if step is None else (self.shift if shifts is None else shifts)[step]

    def shifted(self, position_ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """generate()'s positions for a call as `layer` numbers them, carried on from a renumbered
        prefill."""
        shift = self.shift_at(layer)
        return position_ids if shift is None else position_ids - shift[:, None]

    def pads(self, layer: int) -> bool:
        """Whether `layer` holds a pruned cache with padding of its own."""
        step = self._step(self.padding, layer)
        return step is not None and self.padding[step] is not None

    def mask_key(self, layer: int) -> int | None:
        return self._step(self.padding, layer)

    def real_cached(self, layer: int, cached: int, batch: int, device) -> torch.Tensor | None:
        """Which of the `cached` tokens of `layer` are real (None: all), grown with real ones for
        tokens decoded since."""
        step = self._step(self.padding, layer)
        padding = self.padding[step] if step is not None else None
        if padding is None:
            return None
        if padding.shape[1] >= cached:
            return padding[:, :cached]
        return torch.cat([padding, padding.new_ones(batch, cached - padding.shape[1])], dim=1)

    def note_padding(self, layer: int, real: torch.Tensor, cached: int) -> None:
        """Remember which tokens of the layers a step pruned are real (kept, not padding). None
        when all are (one sequence, or rows that stay aligned)."""
        past = self.real_cached(layer, cached, real.shape[0], real.device)
        if past is None and bool(real.all()):
            if self._step(self.padding, layer) is not None:
                self.padding[layer] = None
            return
        if past is None:
            past = torch.ones(real.shape[0], cached, dtype=torch.bool, device=real.device)
        self.padding[layer] = torch.cat([past, real], dim=1)

    def renumber(self, layer: int, base: torch.Tensor, real: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Positions start..start+M-1 over each row's real tokens left (padding at 1, as generate()
        pads), `start` (B,) being the row's next position as `layer` numbers it (0 in a first
        prefill); the shift that carries later calls on from there. `base`: generate()'s own
        positions of the tokens left, (B, M)."""
        if base.ndim == 3:
            raise UnsupportedModel("renumbered positions need 1-D position ids; this model uses 3-D M-RoPE")
        renumbered = (start[:, None] + real.long().cumsum(1) - 1).masked_fill(~real, 1)
        self.shift[layer] = base[:, -1] - renumbered[:, -1]
        return renumbered

    def padding_mask(self, attention_mask: torch.Tensor | None, layer: int, length: int) -> torch.Tensor | None:
        """The 2-D padding mask for `layer`, whose keys will number `length`. transformers' mask
        covers every token of the conversation: it fits only layers that kept them all; pruned
        layers of a padded batch get theirs, the tokens decoded since then added as real."""
        if self.pads(layer):
            step = self._step(self.padding, layer)
            padding = self.padding[step]
            grown = length - padding.shape[1]
            if grown > 0:
                self.padding[step] = torch.cat([padding, padding.new_ones(padding.shape[0], grown)], dim=1)
            return self.padding[step]
        if attention_mask is not None and attention_mask.shape[-1] == length:
            return attention_mask
        return None  # a pruned layer of one sequence, or of aligned rows: nothing is padding


@dataclass
class _Call:
    """One forward call as it runs: the tokens going through the layers (fewer from a prune step
    on) with their positions, and what the call was given. `base`: generate()'s own positions of
    the tokens (1-D position ids; None for 3-D ones), `real`: which tokens are real (None: all),
    `shifts`: the renumbering shifts earlier calls left, as this call found them."""

    hidden: torch.Tensor
    rope_positions: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cache: DynamicCache | None
    use_cache: bool
    chunk_start: int  # tokens the cache held before the call
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    base: torch.Tensor | None = None
    real: torch.Tensor | None = None
    shifts: dict = field(default_factory=dict)

    def cached(self, layer: int) -> int:
        return self.cache.get_seq_length(layer) if self.cache is not None else 0


class _Masks:
    """The attention mask of each layer of one call. Layers hold different cache lengths after
    pruning, and the queries shrink at each step: a mask per distinct (cached keys, queries,
    padding) shape, built when the shape changes."""

    def __init__(self, config, call: _Call, after: _AfterPruning):
        self.config, self.call, self.after = config, call, after
        self.key: tuple | None = None
        self.mask = None

    def for_layer(self, layer: int, hidden: torch.Tensor):
        kv_len, pads = self.call.cached(layer), self.after.pads(layer)
        key = (kv_len, hidden.shape[1], pads, self.after.mask_key(layer) if pads else None)
        if self.key != key:
            self.mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=self.after.padding_mask(self.call.attention_mask, layer, kv_len + hidden.shape[1]),
                past_key_values=self.call.cache,
                # No position ids: pruned positions jump, which transformers would read as
                # packed sequences and answer with a block-diagonal mask.
                position_ids=None,
                layer_idx=layer,
            )
            self.key = key
        return self.mask


def _check_padding_mask(attention_mask) -> None:
    if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
        # The LVLM built its language model's masks itself: it attends otherwise than
        # causally (PaliGemma attends bidirectionally over the image and prompt prefix).
        raise UnsupportedModel(
            "this model builds its own attention masks for its language model (bidirectional attention "
            "over the image, say); the pruning engine supports causal attention with a padding mask only"
        )


class PrunedDecoder(nn.Module):
    """Runs the wrapped decoder's own layers, norm and rotary embedding, pruning before each layer
    of a `PruningPlan`'s schedule when there is one. Without a plan it is the plain causal decoder."""

    def __init__(self, decoder: nn.Module, replaced_attention: str = "sdpa"):
        super().__init__()
        self.decoder = decoder
        self.replaced_attention = replaced_attention  # the text model's own, restored by uninstall
        self._plans: list[PruningPlan] | None = None  # every call's inside `pruning`
        self._next: list[list[PruningPlan] | None] = []  # the next call's alone (prune_next), if given
        self._after = _AfterPruning()

    @contextmanager
    def pruning(self, plan: PruningPlan | list[PruningPlan] | None) -> Iterator[PruningPlan | list[PruningPlan] | None]:
        """Prune by `plan` in the forward calls made inside the block; a list holds one plan per
        row of a batch (same method, k and layer; each row its own spans). None: a call prunes
        what `prune_next` gives it, else nothing."""
        plans = checked_plans(plan)
        previous = self._plans, self._next, self._after
        self._plans, self._next, self._after = plans, [], _AfterPruning()
        try:
            yield plan
        finally:
            self._plans, self._next, self._after = previous

    def prune_next(self, plans: list[PruningPlan] | None) -> None:
        """The plans of the next forward call alone, one per row (None: it prunes nothing), in
        place of the block's; the call uses them up."""
        self._next = [checked_plans(plans)]

    @property
    def config(self):
        return self.decoder.config

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        plans = self._next.pop() if self._next else self._plans
        _check_padding_mask(attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.decoder.embed_tokens(input_ids)
        call = self._start(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)
        hidden = self._layers(call, self._prune_pass(plans, call), kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.decoder.norm(hidden), past_key_values=call.cache)

    def _start(self, embeds, attention_mask, position_ids, cache, use_cache) -> _Call:
        """The call's cache and positions: a new sequence's, or carried on from a pruning prefill
        of this one."""
        config = self.decoder.config
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        chunk_start = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1], device=embeds.device)[None] + chunk_start
        if chunk_start == 0:  # a new sequence: no pruned cache yet
            self._after = _AfterPruning()
        base = position_ids.expand(embeds.shape[0], -1) if position_ids.ndim == 2 else None
        rope_positions, position_ids = _split_positions(self._after.shifted(position_ids))
        real = attention_mask[:, -embeds.shape[1] :].bool() if attention_mask is not None else None
        shifts = dict(self._after.shift)
        return _Call(
            embeds,
            rope_positions,
            position_ids,
            attention_mask,
            cache,
            use_cache,
            chunk_start,
            None,
            base,
            real,
            shifts,
        )

    def _prune_pass(self, plans: list[PruningPlan] | None, call: _Call) -> PrunePass | None:
        """The pass that prunes this call's image spans; None when the call brings none to prune
        (a decoding step, text, images the budget keeps whole)."""
        if plans is None or not plans[0].method.prunes:
            return None
        batch, chunk_len = call.hidden.shape[:2]
        if len(plans) != batch:
            raise ValueError(f"{len(plans)} pruning plans for a batch of {batch}")
        prune_pass = PrunePass(plans, call.chunk_start, chunk_len, call.attention_mask)
        if not prune_pass.spans:
            return None
        if prune_pass.method.score_queries == "raters":
            prune_pass.rate(call.hidden)  # the input embeddings, before layer 0
        return prune_pass

    def _layers(self, call: _Call, prune_pass: PrunePass | None, kwargs: dict) -> torch.Tensor:
        """The decoder layers over the call's tokens, a prune step before each layer of the pass's
        schedule (whose spans the attention of the layers before measures); where an earlier call
        renumbered the layers from a step on, the call's positions as they number them."""
        masks = _Masks(self.decoder.config, call, self._after)
        call.position_embeddings = self.decoder.rotary_emb(call.hidden, call.rope_positions)
        for index, layer in enumerate(self.decoder.layers[: self.decoder.config.num_hidden_layers]):
            if prune_pass is not None and prune_pass.prunes_before(index):
                self._prune_step(call, prune_pass, index)
            elif index and index in call.shifts:
                self._renumbered(call, call.base - call.shifts[index][:, None])
            call.hidden = layer(
                call.hidden,
                attention_mask=masks.for_layer(index, call.hidden),
                position_embeddings=call.position_embeddings,
                position_ids=call.position_ids,
                past_key_values=call.cache,
                use_cache=call.use_cache,
                prune_pass=prune_pass if prune_pass is not None and prune_pass.scores_in(index) else None,
                **kwargs,
            )
        return call.hidden

    def _renumbered(self, call: _Call, positions: torch.Tensor) -> None:
        call.rope_positions = call.position_ids = positions
        call.position_embeddings = self.decoder.rotary_emb(call.hidden, call.rope_positions)

    def _prune_step(self, call: _Call, prune_pass: PrunePass, layer: int) -> None:
        """The call's tokens cut to the kept ones before `layer`, with their positions (their own,
        or renumbered); which of them are real is noted for the pruned layers' masks."""
        if prune_pass.method.stage_scores:
            self._stage_scores(call, prune_pass, layer)
        keep, call.hidden, real = prune_pass.prune(call.hidden, call.chunk_start, layer, call.real)
        if call.real is not None:  # batch padding and earlier fillers are not real either
            real = real & call.real.gather(1, keep)
        call.real = real
        self._after.note_padding(layer, real, call.cached(layer))
        call.rope_positions = _gather_positions(call.rope_positions, keep)
        if call.position_ids is not None:
            call.position_ids = _gather_positions(call.position_ids, keep)
        if call.base is not None:
            call.base = call.base.gather(1, keep)
        if prune_pass.renumber:
            start = self._next_position(call, layer)
            call.rope_positions = call.position_ids = self._after.renumber(layer, call.base, real, start)
        call.position_embeddings = self.decoder.rotary_emb(call.hidden, call.rope_positions)

    def _next_position(self, call: _Call, layer: int) -> torch.Tensor:
        """Each row's first real token of the call as `layer` numbered its cache before the call:
        0 in a first prefill."""
        base = call.base
        if base is None:
            raise UnsupportedModel("renumbered positions need 1-D position ids; this model uses 3-D M-RoPE")
        first = base.masked_fill(~call.real, base.max() + 1).amin(1) if call.real is not None else base[:, 0]
        shift = self._after.shift_at(layer, call.shifts)
        return first if shift is None else first - shift

    def _stage_scores(self, call: _Call, prune_pass: PrunePass, layer: int) -> None:
        """The spans' scores by the attention that `layer` itself would pay them from the last
        token over the tokens entering it (PyramidDrop's ranking)."""
        cached = call.cached(layer)
        past_real = self._after.real_cached(layer, cached, call.hidden.shape[0], call.hidden.device)
        real = call.real
        if past_real is not None or real is not None:
            now = (
                real
                if real is not None
                else torch.ones(call.hidden.shape[:2], dtype=torch.bool, device=call.hidden.device)
            )
            past = past_real if past_real is not None else now.new_ones(now.shape[0], cached)
            real = torch.cat([past, now], dim=1)
        past_keys = call.cache.layers[layer].keys if cached else None
        importance = attention.stage_importance(
            self.decoder.layers[layer], call.hidden, call.position_embeddings, past_keys, real
        )
        for index, (row, span) in enumerate(prune_pass.spans):
            if layer in prune_pass.items[index].steps:
                scores = importance[row : row + 1, cached + span.start : cached + span.stop]
                prune_pass.record(index, SpanScores(importance=scores))
