"""What a pruning prefill leaves for the later calls on the same KV cache (the decoding steps of
one generate(), a chat's later turns): which cached tokens of the pruned layers are real, and how
far renumbered positions run behind generate()'s. It travels with the cache it describes (one
attribute), so a chat's turns, each its own session, continue it, and two caches never mix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModel, UsageError

# The attribute of a transformers cache that holds its CacheState.
ATTRIBUTE = "asap_pruning"


@dataclass
class CacheState:
    """Per pruning step: `padding[layer]` says which tokens of the cache of the layers from
    `layer` on (to the next step's layer) are real, (B, cached), None where all are;
    `shift[layer]` (B,) how far a renumbered row's positions in those layers run behind the ones
    generate() counts from the whole prompt. `shortened_by`: the method that pruned layer 0's
    cache too (before the language model), whose length then no longer locates the next token
    (`dropped` more tokens precede it): only one-token decoding steps can continue it."""

    padding: dict[int, torch.Tensor | None] = field(default_factory=dict)
    shift: dict[int, torch.Tensor] = field(default_factory=dict)
    shortened_by: str | None = None
    dropped: int = 0  # the tokens layer 0's cache lost: its length plus these is the sequence's

    def check_continuation(self, tokens: int) -> None:
        """Refuse a call of several tokens on a cache whose layer 0 was shortened: generate() would
        feed the part of the prompt it thinks the cache lacks again, and answer from that."""
        if self.shortened_by is not None and tokens > 1:
            raise UsageError(
                f"{self.shortened_by} prunes before the first layer, so a cache it pruned cannot be continued by a "
                "later call; answer each prompt from the start (asap chat refuses these methods for the same reason)"
            )

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


def of(cache) -> CacheState:
    """The state `cache` carries (created with it where it has none): a cache that holds nothing
    yet, or no cache at all (a call without one), starts from none, whatever it held before."""
    if cache is None:
        return CacheState()
    state = getattr(cache, ATTRIBUTE, None)
    if state is None or cache.get_seq_length() == 0:
        state = CacheState()
        setattr(cache, ATTRIBUTE, state)
    return state
