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
from .methods import PruningMethod, SpanView


class UnsupportedModel(AsapError):
    """The model is built in a way the pruning engine cannot drive (yet)."""


@dataclass
class PruningPlan:
    """What to prune in the next prefill: `spans` are [start, end) positions of image tokens in the
    whole token sequence. `layer` is L: layers 0..L-1 see every token. The decoder appends to
    `kept` the absolute positions it kept for each span it pruned, and to `importance` the
    attention each span's tokens received at layer L-1 when the method scores them (outputs,
    for reporting)."""

    method: PruningMethod
    k: int
    layer: int
    spans: list[tuple[int, int]]
    kept: list[torch.Tensor] = field(default_factory=list)
    importance: list[torch.Tensor] = field(default_factory=list)
    merged: int = 0


class PrunePass:
    """The state of one pruning prefill: the spans inside this forward's chunk (chunk
    coordinates) and the scores the attention function records for them at layer L-1."""

    def __init__(self, plan: PruningPlan, chunk_start: int, chunk_len: int):
        self.plan = plan
        self.method = plan.method
        self.layer = plan.layer
        self.spans = [
            slice(start - chunk_start, end - chunk_start)
            for start, end in plan.spans
            if chunk_start <= start and end <= chunk_start + chunk_len
        ]
        self.scores: dict[int, dict[str, torch.Tensor | None]] = {}

    def record(self, index: int, **scores: torch.Tensor | None) -> None:
        self.scores[index] = scores

    def prune(self, hidden: torch.Tensor, chunk_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Select k tokens per span from the output of layer L-1. Returns the kept chunk indices
        (ascending) and the new hidden states (1, kept, d)."""
        keep = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        hidden = hidden.clone()
        for index, span in enumerate(self.spans):
            scores = self.scores.get(index, {})
            if scores.get("importance") is not None:
                self.plan.importance.append(scores["importance"][0])
            n = span.stop - span.start
            if self.plan.k >= n:
                continue  # nothing to prune in this span
            view = SpanView(
                start=span.start + chunk_start,
                hidden=hidden[0, span],
                importance=_first(scores.get("importance")),
                mass=_first(scores.get("mass")),
                saliency=_first(scores.get("saliency")),
            )
            selection = self.method.select(view, self.plan.k)
            kept = selection.kept + span.start
            keep[span] = False
            keep[kept] = True
            hidden[0, kept] = selection.hidden
            self.plan.kept.append(kept + chunk_start)
            self.plan.merged += selection.merged
        index = keep.nonzero().squeeze(1)
        return index, hidden[:, index]


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


def _first(scores: torch.Tensor | None) -> torch.Tensor | None:
    return None if scores is None else scores[0]


class PrunedDecoder(nn.Module):
    """Runs the wrapped decoder's own layers, norm and rotary embedding, pruning between layer
    L-1 and L when a `PruningPlan` says so. Without a plan it is the plain causal decoder."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.plan: PruningPlan | None = None

    @contextmanager
    def pruning(self, plan: PruningPlan | None) -> Iterator[PruningPlan | None]:
        """Prune by `plan` in the forward calls made inside the block."""
        previous, self.plan = self.plan, plan
        try:
            yield plan
        finally:
            self.plan = previous

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
        rope_positions, position_ids = _split_positions(position_ids)

        prune_pass = None
        if self.plan is not None and self.plan.method.prunes:
            prune_pass = PrunePass(self.plan, chunk_start, chunk_len)
            if not prune_pass.spans:
                prune_pass = None
        if prune_pass is not None and inputs_embeds.shape[0] != 1:
            raise NotImplementedError("pruning runs on one sequence at a time (batches come later)")

        hidden = inputs_embeds
        position_embeddings = decoder.rotary_emb(hidden, rope_positions)
        mask, mask_kv_len = None, None
        for index, layer in enumerate(decoder.layers[: config.num_hidden_layers]):
            if prune_pass is not None and index == prune_pass.layer:
                keep, hidden = prune_pass.prune(hidden, chunk_start)
                rope_positions = rope_positions[..., keep]
                position_ids = position_ids[..., keep] if position_ids is not None else None
                position_embeddings = decoder.rotary_emb(hidden, rope_positions)
                mask_kv_len = None
            # Layers hold different cache lengths after pruning: a mask per distinct length.
            kv_len = past_key_values.get_seq_length(index) if past_key_values is not None else 0
            if mask_kv_len is None or kv_len != mask_kv_len:
                # The padding mask covers every token of the conversation: it fits only layers that
                # kept them all. Pruned layers get none (batch 1: there is no padding to mask).
                fits = attention_mask is not None and attention_mask.shape[-1] == kv_len + hidden.shape[1]
                mask = create_causal_mask(
                    config=config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask if fits else None,
                    past_key_values=past_key_values,
                    # No position ids: pruned positions jump, which transformers would read as
                    # packed sequences and answer with a block-diagonal mask.
                    position_ids=None,
                    layer_idx=index,
                )
                mask_kv_len = kv_len
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                asap_pass=prune_pass if prune_pass is not None and index < prune_pass.layer else None,
                **kwargs,
            )
        hidden = decoder.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)
