"""The language model's layer loop, driven by the project so that visual tokens can be pruned.

`PrunedDecoder` wraps the LVLM's own text decoder (`model.get_decoder()`) and is installed with
the public `model.set_decoder`. The LVLM keeps doing everything else itself: vision tower,
projector, placing image features, the LM head, `generate()` with its sampling, streaming and
KV cache. We chose this over an own prefill/decode loop because each model family's
multimodal preprocessing (LLaVA-NeXT tiles and newlines, Qwen's 3-D positions) stays the
model's own code, untouched.

A `PruningPlan` is set for the duration of one `generate()` or forward call with
`with decoder.pruning(plan):` (generate() rejects keyword arguments its model's forward does not
name, so the plan cannot travel as one). The plan names image spans in absolute positions of the
conversation, so it is inert during decoding steps and earlier turns, and a chat turn that
brings a new image prunes only that image's span in its own prefill.

After layer L-1 the sequence shrinks to text + k visual tokens per span; the kept tokens keep
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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import AsapError
from .methods import PruningMethod, SpanScores, SpanView


class UnsupportedModel(AsapError):
    """The model is built in a way the pruning engine cannot drive (yet)."""


@dataclass
class PruningPlan:
    """What to prune in the next prefill: `spans` are [start, end) positions of image tokens in the
    whole token sequence. `layer` is L: layers 0..L-1 see every token. A span the method would
    not shrink at budget k (k >= its tokens) runs exactly as vanilla: no SG-BiMask, no scoring,
    unless `score_only` asks for the scores (attention figures). `renumber` (methods that prune
    before the language model only) numbers the pruned sequence afresh, as a pipeline that feeds
    the model fewer embeddings does (official DivPrune). The decoder appends to `kept` the
    absolute positions it kept for each span it pruned, to `roles` why each of them was kept
    (engine.methods.ROLES) and to `absorbed` the span indices (0: the span's first token) whose
    states each one absorbed (ASAP's anchors, pool's cells), and to `importance` the attention
    each span's tokens received at layer L-1 when the method scores them (outputs, for reports
    and figures)."""

    method: PruningMethod
    k: int
    layer: int
    spans: list[tuple[int, int]]
    kept: list[torch.Tensor] = field(default_factory=list)
    roles: list[list[str]] = field(default_factory=list)
    absorbed: list[list[list[int]]] = field(default_factory=list)
    importance: list[torch.Tensor] = field(default_factory=list)
    merged: int = 0
    score_only: bool = False  # score every span at layer L-1 as the method would, prune none
    renumber: bool = False  # kept tokens take positions 0..M-1 (a shorter prompt) instead of their own

    def shrinks(self, start: int, end: int) -> bool:
        """Whether the span [start, end) loses tokens at this budget; one that does not runs as vanilla
        (as every span does under vanilla, whatever its k)."""
        return self.method.prunes and self.method.kept_count(end - start, self.k) < end - start


class PrunePass:
    """The state of one pruning prefill over a batch (one plan per row): the spans inside this
    forward's chunk as (row, slice in chunk coordinates) pairs, and the scores the attention
    function records for each pair at layer L-1."""

    def __init__(self, plans: list[PruningPlan], chunk_start: int, chunk_len: int, attention_mask: torch.Tensor | None):
        self.plans = plans
        self.attention_mask = attention_mask
        self.method = plans[0].method
        self.layer = plans[0].layer
        self.k = plans[0].k
        self.spans = [
            (row, slice(start - chunk_start, end - chunk_start))
            for row, plan in enumerate(plans)
            for start, end in plan.spans
            if chunk_start <= start and end <= chunk_start + chunk_len and (plan.score_only or plan.shrinks(start, end))
        ]
        self.scores: dict[int, SpanScores] = {}  # by index into `spans`

    def record(self, index: int, scores: SpanScores) -> None:
        self.scores[index] = scores

    def _unpadded(self, row: int, position: int) -> int:
        """A position of the padded batch, counted in its own row's tokens (padding left out)."""
        if self.attention_mask is None:
            return position
        return int(self.attention_mask[row, :position].sum())

    def prune(self, hidden: torch.Tensor, chunk_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Select k tokens per span from the output of layer L-1 (B, N, d). Returns, per row,
        the chunk indices that go on (B, M), ascending, the hidden states there (B, M, d), and
        which of them are real (B, M): rows that keep fewer than M tokens are left-filled with
        some of their dropped slots, masked out, as a padded batch is."""
        batch, length = hidden.shape[:2]
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        hidden = hidden.clone()
        for index, (row, span) in enumerate(self.spans):
            plan, scores = self.plans[row], self.scores.get(index, SpanScores())
            if scores.importance is not None:
                plan.importance.append(scores.importance[0])
            if plan.score_only:
                continue
            view = SpanView(
                start=self._unpadded(row, span.start + chunk_start),
                hidden=hidden[row, span],
                importance=_first(scores.importance),
                mass=_first(scores.mass),
                saliency=_first(scores.saliency),
            )
            selection = self.method.select(view, self.k)
            kept = selection.kept + span.start
            keep[row, span] = False
            keep[row, kept] = True
            hidden[row, kept] = selection.hidden
            plan.kept.append(kept + chunk_start)
            plan.roles.append(selection.token_roles())
            plan.absorbed.append(selection.token_absorbed())
            plan.merged += selection.merged
        # Kept tokens rank above dropped ones, each group in position order: the top `width`
        # ranks of a row are its kept tokens and, for a row that keeps fewer than the longest,
        # its last dropped slots as fillers; sorted by rank, the fillers come first.
        width = int(keep.sum(1).max())
        position = torch.arange(length, device=hidden.device)
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
    """What a pruning prefill leaves for the decoding steps of the same call. `padding`: which
    tokens of the pruned layers' cache are real (rows padded to one length), (B, cached), from
    layer `padding_from` on; None: all are. `position_shift` (B,): how far a renumbered row's
    positions run behind the ones generate() counts from the whole prompt."""

    padding_from: int | None = None
    padding: torch.Tensor | None = None
    position_shift: torch.Tensor | None = None


class PrunedDecoder(nn.Module):
    """Runs the wrapped decoder's own layers, norm and rotary embedding, pruning between layer
    L-1 and L when a `PruningPlan` says so. Without a plan it is the plain causal decoder."""

    def __init__(self, decoder: nn.Module, replaced_attention: str = "sdpa"):
        super().__init__()
        self.decoder = decoder
        self.replaced_attention = replaced_attention  # the text model's own, restored by uninstall
        self.plans: list[PruningPlan] | None = None
        self.after = _AfterPruning()

    @contextmanager
    def pruning(self, plan: PruningPlan | list[PruningPlan] | None) -> Iterator[PruningPlan | list[PruningPlan] | None]:
        """Prune by `plan` in the forward calls made inside the block; a list holds one plan per
        row of a batch (same method, k and layer; each row its own spans)."""
        plans = [plan] if isinstance(plan, PruningPlan) else plan
        if plans and len({(p.method, p.k, p.layer) for p in plans}) != 1:
            raise ValueError("the plans of one batch must share method, k and layer")
        previous = self.plans, self.after
        self.plans, self.after = plans, _AfterPruning()
        try:
            yield plan
        finally:
            self.plans, self.after = previous

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
        decoder, config = self.decoder, self.decoder.config
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
            # The LVLM built its language model's masks itself: it attends otherwise than
            # causally (PaliGemma attends bidirectionally over the image and prompt prefix).
            raise UnsupportedModel(
                "this model builds its own attention masks for its language model (bidirectional attention "
                "over the image, say); the pruning engine supports causal attention with a padding mask only"
            )
        if inputs_embeds is None:
            inputs_embeds = decoder.embed_tokens(input_ids)
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        chunk_start = past_key_values.get_seq_length() if past_key_values is not None else 0
        chunk_len = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(chunk_len, device=inputs_embeds.device)[None] + chunk_start
        if chunk_start == 0:  # a new sequence: no pruned cache yet
            self.after = _AfterPruning()
        elif self.after.position_shift is not None:
            position_ids = position_ids - self.after.position_shift[:, None]
        rope_positions, position_ids = _split_positions(position_ids)
        prune_pass = None
        if self.plans is not None and self.plans[0].method.prunes:
            if len(self.plans) != inputs_embeds.shape[0]:
                raise ValueError(f"{len(self.plans)} pruning plans for a batch of {inputs_embeds.shape[0]}")
            prune_pass = PrunePass(self.plans, chunk_start, chunk_len, attention_mask)
            if not prune_pass.spans:
                prune_pass = None

        hidden = inputs_embeds
        position_embeddings = decoder.rotary_emb(hidden, rope_positions)
        mask, mask_key = None, None
        for index, layer in enumerate(decoder.layers[: config.num_hidden_layers]):
            if prune_pass is not None and index == prune_pass.layer:
                keep, hidden, real = prune_pass.prune(hidden, chunk_start)
                if attention_mask is not None:  # batch padding kept as a filler is not real either
                    real = real & attention_mask[:, -chunk_len:].bool().gather(1, keep)
                cached = past_key_values.get_seq_length(index) if past_key_values is not None else 0
                self._note_padding(index, real, cached)
                rope_positions = _gather_positions(rope_positions, keep)
                position_ids = _gather_positions(position_ids, keep) if position_ids is not None else None
                if self.plans[0].renumber:
                    rope_positions = position_ids = self._renumber(rope_positions, real)
                position_embeddings = decoder.rotary_emb(hidden, rope_positions)
            # Layers hold different cache lengths after pruning, and the queries shrink at layer
            # L: a mask per distinct (cached keys, queries, padding) shape.
            kv_len = past_key_values.get_seq_length(index) if past_key_values is not None else 0
            pruned = self.after.padding_from is not None and index >= self.after.padding_from
            if mask_key != (kv_len, hidden.shape[1], pruned):
                mask = create_causal_mask(
                    config=config,
                    inputs_embeds=hidden,
                    attention_mask=self._padding(attention_mask, pruned, kv_len + hidden.shape[1]),
                    past_key_values=past_key_values,
                    # No position ids: pruned positions jump, which transformers would read as
                    # packed sequences and answer with a block-diagonal mask.
                    position_ids=None,
                    layer_idx=index,
                )
                mask_key = (kv_len, hidden.shape[1], pruned)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                prune_pass=prune_pass if prune_pass is not None and index < prune_pass.layer else None,
                **kwargs,
            )
        hidden = decoder.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)

    def _note_padding(self, layer: int, real: torch.Tensor, cached: int) -> None:
        """Remember which tokens of the pruned layers are real (kept, not padding). Nothing to
        remember when all are (one sequence, or rows that stay aligned)."""
        if bool(real.all()):
            return
        past = torch.ones(real.shape[0], cached, dtype=torch.bool, device=real.device)
        self.after.padding_from, self.after.padding = layer, torch.cat([past, real], dim=1)

    def _renumber(self, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Positions 0..M-1 over each row's real kept tokens (padding at 1, as generate() pads),
        and the shift that carries the decoding steps on from there."""
        if positions.ndim == 3:
            raise UnsupportedModel("renumbered positions need 1-D position ids; this model uses 3-D M-RoPE")
        renumbered = (real.long().cumsum(1) - 1).masked_fill(~real, 1)
        self.after.position_shift = positions[:, -1] - renumbered[:, -1]
        return renumbered

    def _padding(self, attention_mask: torch.Tensor | None, pruned: bool, length: int) -> torch.Tensor | None:
        """The 2-D padding mask for a layer whose keys will number `length`. transformers' mask
        covers every token of the conversation: it fits only layers that kept them all; pruned
        layers of a padded batch get theirs, the tokens decoded since then added as real."""
        if pruned:
            grown = length - self.after.padding.shape[1]
            if grown > 0:
                ones = self.after.padding.new_ones(self.after.padding.shape[0], grown)
                self.after.padding = torch.cat([self.after.padding, ones], dim=1)
            return self.after.padding
        if attention_mask is not None and attention_mask.shape[-1] == length:
            return attention_mask
        return None  # a pruned layer of one sequence, or of aligned rows: nothing is padding
