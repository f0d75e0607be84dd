"""The language model's layer loop, driven by the project so that visual tokens can be pruned.

`PrunedDecoder` wraps the LVLM's own text decoder (`model.get_decoder()`) and is installed with
the public `model.set_decoder`. The LVLM keeps doing everything else itself: vision tower,
projector, placing image features, the LM head, `generate()` with its sampling, streaming and
KV cache. We chose this over an own prefill/decode loop because each model family's
multimodal preprocessing (LLaVA-NeXT tiles and newlines, Qwen's 3-D positions) stays the
model's own code, untouched.

Everything the decoder reads and writes across calls is explicit:

- its `session` (engine/session.py, attached for an `asapcli.pruned` block) hands each forward
  call its plans (one per row; the LVLM never hands its decoder the input_ids, so the session
  plans the call before the model's forward runs) and takes back what the call's prefill did,
  one SpanRecord per span;
- the cache it continues carries what earlier prefills left for later calls (engine/cache_state.py);
- the attention function of the layers that measure a prefill's spans receives the pass as a
  keyword argument, which transformers hands through the decoder layer to the registered
  attention function (`AttentionInterface`): the one seam in its code, checked after every
  layer that needs it, so that a transformers that stops passing it fails loudly.

A call is one of two phases. A pruning prefill (`_prefill`): the call brings image spans its
plans shrink; before each layer of the method's schedule the spans lose tokens (one step for
the single-layer methods, several for multi-stage ones such as PyramidDrop). After layer L-1
the sequence holds text + the kept visual tokens; the kept tokens keep their ORIGINAL position
ids, so RoPE is unchanged for them. Any other call (`_continue`: a decoding step, a chat's text
turn, a prompt with nothing to prune) runs the layers over what the cache holds. The
DynamicCache then holds all tokens in layers < L and the pruned sequence in layers >= L, or,
with a compact cache (`kv_cache="compact"`), the pruned sequence in every layer once the prefill
is done. Each layer's attention follows what that layer holds; a call's positions follow the
sequence, the tokens layer 0 lost included (engine/cache_state.py: a prefill that cuts layer 0,
a compact one or one before the language model, continues on a SequenceCache, or in one-token
decoding steps).

A batch takes one plan per row (left-padded, as generate() pads). Rows may keep different
numbers of tokens (LLaVA-NeXT tiles differ per image): the shorter rows are left-filled with
some of their dropped slots, and the pruned layers get their own padding mask that marks those
and the batch padding, kept for the decoding steps of the same call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import UnsupportedModel
from . import attention, cache_state
from .cache_state import CacheState
from .methods import SpanScores
from .plans import PruningPlan
from .prune_pass import PrunePass

if TYPE_CHECKING:
    from .session import PruningSession


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


@dataclass
class _Call:
    """One forward call as it runs: the tokens going through the layers (fewer from a prune step
    on) with their positions, and what the call was given. `base`: generate()'s own positions of
    the tokens (1-D position ids; None for 3-D ones), `real`: which tokens are real (None: all),
    `state`: what earlier prefills left on the cache (a pruning prefill adds to it), `shifts`: the
    renumbering shifts earlier calls left, as this call found them."""

    hidden: torch.Tensor
    rope_positions: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cache: DynamicCache | None
    use_cache: bool
    chunk_start: int  # tokens the cache held before the call
    state: CacheState
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    base: torch.Tensor | None = None
    real: torch.Tensor | None = None
    shifts: dict = field(default_factory=dict)
    # Each prune step's layer, the indices it kept of the tokens entering it and which are real: a compact cache's cuts.
    steps: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def cached(self, layer: int) -> int:
        return cache_state.held(self.cache, layer)


class _Masks:
    """The attention mask of each layer of one call. Layers hold different cache lengths after
    pruning, and the queries shrink at each step: a mask per distinct (cached keys, queries,
    padding) shape, built when the shape changes."""

    def __init__(self, config, call: _Call):
        self.config, self.call, self.after = config, call, call.state
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
    of a plan's schedule when its session gives the call plans. Without them (no session, or a
    call the session does not prune) it is the plain causal decoder."""

    def __init__(self, decoder: nn.Module, replaced_attention: str = "sdpa"):
        super().__init__()
        self.decoder = decoder
        self.replaced_attention = replaced_attention  # the text model's own, restored by uninstall
        self.session: PruningSession | None = None  # attached by engine.session for a block's duration

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
        plans = self.session.take_plans() if self.session is not None else None
        _check_padding_mask(attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.decoder.embed_tokens(input_ids)
        call = self._start(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)
        prune_pass = self._prune_pass(plans, call)
        hidden = self._continue(call, kwargs) if prune_pass is None else self._prefill(call, prune_pass, kwargs)
        if plans is not None:
            self.session.record(prune_pass.records if prune_pass is not None else [[] for _ in plans])
        return BaseModelOutputWithPast(last_hidden_state=self.decoder.norm(hidden), past_key_values=call.cache)

    def _start(self, embeds, attention_mask, position_ids, cache, use_cache) -> _Call:
        """The call's cache and positions: a new sequence's, or carried on from a pruning prefill
        of this one (the state its cache carries)."""
        config = self.decoder.config
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        state = cache_state.of(cache)
        cache_state.check_continuation(cache, embeds.shape[1])
        chunk_start = cache_state.held(cache, 0) + state.dropped  # the sequence's tokens before the call
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1], device=embeds.device)[None] + chunk_start
        base = position_ids.expand(embeds.shape[0], -1) if position_ids.ndim == 2 else None
        rope_positions, position_ids = _split_positions(state.shifted(position_ids))
        real = attention_mask[:, -embeds.shape[1] :].bool() if attention_mask is not None else None
        return _Call(
            embeds,
            rope_positions,
            position_ids,
            attention_mask,
            cache,
            use_cache,
            chunk_start,
            state,
            None,
            base,
            real,
            dict(state.shift),
        )

    def _prune_pass(self, plans: list[PruningPlan] | None, call: _Call) -> PrunePass | None:
        """The pass that prunes this call's image spans; None when the call brings none to prune
        (a decoding step, text, images the budget keeps whole)."""
        if plans is None or not plans[0].method.prunes:
            return None
        batch, chunk_len = call.hidden.shape[:2]
        if len(plans) != batch:
            raise ValueError(f"{len(plans)} pruning plans for a batch of {batch}")
        prune_pass = PrunePass(plans, call.chunk_start, chunk_len, call.attention_mask, self.session.vision)
        if not prune_pass.spans:
            return None
        if prune_pass.method.score_queries == "raters":
            prune_pass.rate(call.hidden)  # the input embeddings, before layer 0
        return prune_pass

    def _prefill(self, call: _Call, prune_pass: PrunePass, kwargs: dict) -> torch.Tensor:
        """A pruning prefill: the layers over the call's tokens, a prune step before each layer of
        the pass's schedule, the attention of the layers before it measuring its spans; then, for
        a compact cache, the layers before the first step cut to what it kept."""
        entering = call.real
        hidden = self._layers(call, prune_pass, kwargs)
        if prune_pass.method.compacts and call.use_cache:
            why = f"{prune_pass.method.name} with --kv-cache compact cut the first layer's cache"
            cache_state.compact(call.cache, call.steps, prune_pass.first_steps(), prune_pass.chunk[1], entering, why)
        return hidden

    def _continue(self, call: _Call, kwargs: dict) -> torch.Tensor:
        """A call that prunes nothing (a decoding step, text, a prompt kept whole): the layers over
        the call's tokens and the cache as earlier prefills left it."""
        return self._layers(call, None, kwargs)

    def _layers(self, call: _Call, prune_pass: PrunePass | None, kwargs: dict) -> torch.Tensor:
        """The decoder layers over the call's tokens, a prune step before each layer of the pass's
        schedule; where an earlier call renumbered the layers from a step on, the call's positions
        as they number them."""
        masks = _Masks(self.decoder.config, call)
        call.position_embeddings = self.decoder.rotary_emb(call.hidden, call.rope_positions)
        for index, layer in enumerate(self.decoder.layers[: self.decoder.config.num_hidden_layers]):
            if prune_pass is not None and prune_pass.prunes_before(index):
                self._prune_step(call, prune_pass, index)
            elif index and index in call.shifts:
                self._renumbered(call, call.base - call.shifts[index][:, None])
            measures = prune_pass is not None and prune_pass.scores_in(index)
            call.hidden = layer(
                call.hidden,
                attention_mask=masks.for_layer(index, call.hidden),
                position_embeddings=call.position_embeddings,
                position_ids=call.position_ids,
                past_key_values=call.cache,
                use_cache=call.use_cache,
                prune_pass=prune_pass if measures else None,
                **kwargs,
            )
            if measures and index not in prune_pass.measured:
                raise UnsupportedModel(
                    f"{type(layer).__name__} did not hand the pruning pass to its attention function (layer "
                    f"{index}): this transformers version passes a decoder layer's keyword arguments otherwise; "
                    "the scores it needs were not taken"
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
        before = call.hidden.shape[1]
        keep, call.hidden, real = prune_pass.prune(call.hidden, call.chunk_start, layer, call.real)
        if call.real is not None:  # batch padding and earlier fillers are not real either
            real = real & call.real.gather(1, keep)
        call.real = real
        call.state.note_padding(layer, real, call.cached(layer))
        call.steps.append((layer, keep, real))
        if layer == 0:  # layer 0's cache is shorter than the sequence from now on
            call.state.shortened(
                f"{prune_pass.method.name} prunes before the first layer", before - call.hidden.shape[1]
            )
        call.rope_positions = _gather_positions(call.rope_positions, keep)
        if call.position_ids is not None:
            call.position_ids = _gather_positions(call.position_ids, keep)
        if call.base is not None:
            call.base = call.base.gather(1, keep)
        if prune_pass.renumber:
            start = self._next_position(call, layer)
            call.rope_positions = call.position_ids = call.state.renumber(layer, call.base, real, start)
        call.position_embeddings = self.decoder.rotary_emb(call.hidden, call.rope_positions)

    def _next_position(self, call: _Call, layer: int) -> torch.Tensor:
        """Each row's first real token of the call as `layer` numbered its cache before the call:
        0 in a first prefill."""
        base = call.base
        if base is None:
            raise UnsupportedModel("renumbered positions need 1-D position ids; this model uses 3-D M-RoPE")
        first = base.masked_fill(~call.real, base.max() + 1).amin(1) if call.real is not None else base[:, 0]
        shift = call.state.shift_at(layer, call.shifts)
        return first if shift is None else first - shift

    def _stage_scores(self, call: _Call, prune_pass: PrunePass, layer: int) -> None:
        """The spans' scores by the attention that `layer` itself would pay them from the last
        token over the tokens entering it (PyramidDrop's ranking)."""
        cached = call.cached(layer)
        past_real = call.state.real_cached(layer, cached, call.hidden.shape[0], call.hidden.device)
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
