"""What a pruning prefill leaves for the later calls on the same KV cache (the decoding steps of
one generate(), a chat's later turns): which cached tokens of the pruned layers are real, how
far renumbered positions run behind generate()'s, and how many tokens layer 0's cache lost. It
travels with the cache it describes (one attribute), so a chat's turns, each its own session,
continue it, and two caches never mix.

A cache whose layer 0 lost tokens (a method before the language model; --kv-cache compact) no
longer tells by its length where the sequence is, which generate() reads to find what a later
call brings that the cache lacks: a SequenceCache reports the sequence's length instead."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..errors import UnsupportedModel, UsageError
from .ops import left_filled

# The attribute of a transformers cache that holds its CacheState.
ATTRIBUTE = "asap_pruning"


@dataclass
class CacheState:
    """Per pruning step: `padding[layer]` says which tokens of the cache of the layers from
    `layer` on (to the next step's layer) are real, (B, cached), None where all are;
    `shift[layer]` (B,) how far a renumbered row's positions in those layers run behind the ones
    generate() counts from the whole prompt. `shortened_by`: what pruned layer 0's cache too (a
    method before the language model, a compact cache), whose length then no longer locates the
    next token (`dropped` more tokens precede it)."""

    padding: dict[int, torch.Tensor | None] = field(default_factory=dict)
    shift: dict[int, torch.Tensor] = field(default_factory=dict)
    shortened_by: str | None = None
    dropped: int = 0  # the tokens layer 0's cache lost: its length plus these is the sequence's

    def shortened(self, why: str, dropped: int) -> None:
        """Layer 0's cache lost `dropped` of the tokens a prefill brought (`why`: by what)."""
        self.shortened_by = why
        self.dropped += dropped

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

    def copy(self) -> CacheState:
        return CacheState(dict(self.padding), dict(self.shift), self.shortened_by, self.dropped)


class SequenceCache(DynamicCache):
    """A DynamicCache whose length (layer 0's, what generate() asks) is the sequence's: the tokens
    its layer 0 holds plus those pruning dropped from it. generate() prefills what a call brings
    past that length, so a later call (a chat's next turn) can continue a cache whose layer 0 lost
    tokens; on a plain DynamicCache only one-token decoding steps can. Each layer's attention
    still follows what that layer holds (`held`)."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        held = super().get_seq_length(layer_idx)
        state = getattr(self, ATTRIBUTE, None)
        return held + state.dropped if layer_idx == 0 and held and state is not None else held

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)  # a query follows the keys its own layer holds


def held(cache, layer: int) -> int:
    """The tokens layer `layer` of `cache` holds (0 without a cache)."""
    if cache is None or layer >= len(cache.layers):
        return 0
    return cache.layers[layer].get_seq_length()


def check_continuation(cache, tokens: int) -> None:
    """Refuse a call of several tokens on a plain cache whose layer 0 was shortened: generate()
    would feed again the part of the prompt it thinks the cache lacks, and answer from that."""
    state = getattr(cache, ATTRIBUTE, None) if held(cache, 0) else None  # an empty cache starts afresh
    if state is not None and state.shortened_by is not None and tokens > 1 and not isinstance(cache, SequenceCache):
        raise UsageError(
            f"{state.shortened_by}, so a cache it pruned cannot be continued by a later call on transformers' "
            "DynamicCache, whose length is no longer the sequence's; answer each prompt from the start, or hand "
            "generate() an asapcli.SequenceCache (asap chat's)"
        )


def compact(cache, steps: list, spans: list, chunk: int, real: torch.Tensor | None, why: str) -> None:
    """Cut, once the prefill is done (--kv-cache compact), the caches of the layers before each
    image span's first prune step to what that step kept of it: every layer then holds what the
    paper's Table 4 counts. `steps`: the prefill's prune steps in order, (layer, the indices each
    row kept of the tokens entering it (B, M), which of them are real); `spans`: (row, start,
    end, its first step's layer, the chunk indices that step kept) per pruned span
    (PrunePass.first_steps); `chunk`: the tokens the prefill brought, `real`: which of them are
    real (None: all). Rows that keep fewer tokens than others are left-filled with masked slots,
    as a prune step fills them."""
    if not spans:
        return
    state, batch, device = of(cache), steps[0][1].shape[0], steps[0][1].device
    index = torch.arange(chunk, device=device).expand(batch, -1)
    real = torch.ones(batch, chunk, dtype=torch.bool, device=device) if real is None else real
    start = 0
    for layer, keep, kept_real in steps:
        wanted = _compact_keeps(index, spans, start)
        if start < layer and not bool(wanted.all()):
            width = _cut(cache, state, start, layer, wanted, real)
            if start == 0:
                state.shortened(why, chunk - width)
        index, real, start = index.gather(1, keep), kept_real, layer


def _compact_keeps(index: torch.Tensor, spans: list, start: int) -> torch.Tensor:
    """Which of the tokens the layers from `start` hold (chunk indices `index`, (B, M)) a compact
    cache keeps: all but those of a span not pruned yet there that its first step dropped."""
    wanted = torch.ones_like(index, dtype=torch.bool)
    for row, begin, end, first_layer, kept in spans:
        if first_layer > start:
            ids = index[row]
            wanted[row] &= (ids < begin) | (ids >= end) | torch.isin(ids, kept)
    return wanted


def _cut(cache, state: CacheState, start: int, stop: int, wanted: torch.Tensor, real: torch.Tensor) -> int:
    """Layers start..stop-1 cut to the `wanted` of the tokens the prefill brought them (B, M),
    rows left-filled; their padding noted. The tokens they hold now of the prefill's."""
    order, filled = left_filled(wanted)
    before = held(cache, start) - wanted.shape[1]
    state.note_padding(start, real.gather(1, order) & filled, before)
    for layer in cache.layers[start:stop]:
        index = (order + before)[:, None, :, None]
        for name in ("keys", "values"):
            states = getattr(layer, name)
            taken = states.gather(2, index.expand(-1, states.shape[1], -1, states.shape[3]))
            setattr(layer, name, torch.cat([states[:, :, :before], taken], dim=2))
    return order.shape[1]


def of(cache) -> CacheState:
    """The state `cache` carries (created with it where it has none): a cache that holds nothing
    yet, or no cache at all (a call without one), starts from none, whatever it held before."""
    if cache is None:
        return CacheState()
    state = getattr(cache, ATTRIBUTE, None)
    if state is None or held(cache, 0) == 0:
        state = CacheState()
        setattr(cache, ATTRIBUTE, state)
    return state
