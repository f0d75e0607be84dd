"""The attention function registered with transformers for the language model.

It receives query and key after RoPE (transformers' AttentionInterface contract), and the
pruning pass as the keyword argument `prune_pass` that the pruned decoder gives its layers and
transformers hands on (the decoder checks that it arrived). Outside a
pruning prefill, and in layers >= L, it is transformers' own SDPA function unchanged. In layers
0..L-1 of a pruning prefill it computes the attention mass of each image span (Eq. 2), swaps the
causal mask for SG-BiMask inside the spans when the method asks for it (Eq. 4-5), and at layer
L-1 records the attention each visual token receives. The output always comes from SDPA: the
only N x N tensor it builds is the additive mask, as any masked SDPA call does.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import ops
from .methods import PruningMethod, SpanScores

if TYPE_CHECKING:
    from .prune_pass import PrunePass

ATTENTION_NAME = "asap_sdpa"


def additive_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, kv_len: int, rows: slice = slice(None)
) -> torch.Tensor:
    """The (B, 1, r, kv) float mask, for query `rows`, equivalent to what transformers passed:
    None means causal with the queries at the end of the keys, a bool mask means True = attend."""
    batch, _, q_len, _ = query.shape
    dtype, device = query.dtype, query.device
    row_index = torch.arange(q_len, device=device)[rows]
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask[:, :, rows].to(dtype).expand(batch, 1, len(row_index), kv_len).clone()
    if attention_mask is None:
        allowed = torch.arange(kv_len, device=device)[None, :] <= row_index[:, None] + (kv_len - q_len)
        attention_mask = allowed[None, None]
    else:
        attention_mask = attention_mask[:, :, rows]
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask = torch.where(attention_mask, torch.zeros((), dtype=dtype, device=device), blocked)
    return mask.expand(batch, 1, len(row_index), kv_len).contiguous()


def score_rows(score_queries: str, span: slice, q_len: int) -> slice:
    """Query rows (chunk coordinates) whose attention ranks the tokens of `span`."""
    if score_queries == "last":
        return slice(q_len - 1, q_len)
    if score_queries == "text":
        return slice(span.stop, q_len) if span.stop < q_len else slice(q_len - 1, q_len)
    if score_queries == "all":
        return slice(span.start, q_len)
    raise ValueError(f"unknown score queries {score_queries!r}")


@dataclass(frozen=True)
class _Heads:
    """One attention call of layers 0..L-1 of a pruning prefill, as the span scores read it: the
    queries, the keys repeated to as many heads, the values and the mask transformers passed."""

    module: torch.nn.Module
    query: torch.Tensor
    keys: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float

    @property
    def offset(self) -> int:
        """Where the chunk's queries sit among the keys: they are the last q_len."""
        return self.keys.shape[2] - self.query.shape[2]


def asap_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    prune_pass: PrunePass | None = None,
    **kwargs,
):
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if prune_pass is None or not prune_pass.scores_in(module.layer_idx):
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    heads = _Heads(module, query, repeat_kv(key, module.num_key_value_groups), value, attention_mask, scaling)
    attention_mask = _measure_spans(heads, prune_pass)
    prune_pass.measured.add(module.layer_idx)  # the decoder checks that the pass got here
    return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _measure_spans(heads: _Heads, prune_pass: PrunePass) -> torch.Tensor | None:
    """Each span's attention mass (Eq. 2), SG-BiMask inside the spans when the method asks for
    it, and at layer L-1 the spans' scores recorded in the pass. Returns the mask the layer then
    attends with: SG-BiMask in place of the causal mask, or the one transformers passed."""
    method = prune_pass.method
    query, keys, scaling = heads.query, heads.keys, heads.scaling
    is_scoring_layer = prune_pass.scores_at(heads.module.layer_idx)
    need_mass = method.sg_bimask or (is_scoring_layer and method.needs_mass)
    mask = additive_mask(heads.attention_mask, query, keys.shape[2]) if method.sg_bimask else None
    for index, (row, span) in enumerate(prune_pass.spans):
        key_span = slice(span.start + heads.offset, span.stop + heads.offset)
        rows_of = slice(row, row + 1)  # this span's batch row
        mass = saliency = None
        if need_mass:
            mass = ops.attention_mass(query[rows_of, :, span], keys[rows_of, :, key_span], scaling)
            saliency = ops.min_max(mass)
        if method.sg_bimask:
            mask[rows_of, :, span, key_span] = ops.sg_bimask(saliency, method.lambda_max)[:, None].to(mask.dtype)
        if is_scoring_layer:
            queries = prune_pass.query_rows(index, span, query.shape[2]) if method.score_queries else None
            importance = _importance(heads, method, rows_of, span, queries, mask) if method.score_queries else None
            prune_pass.record(index, SpanScores(importance=importance, mass=mass, saliency=saliency))
    return mask if method.sg_bimask else heads.attention_mask


def _importance(
    heads: _Heads,
    method: PruningMethod,
    rows_of: slice,
    span: slice,
    queries: slice | torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The attention the tokens of `span` (chunk coordinates) receive from the query rows
    `queries`, weighted by their value norms when the method scores contributions (CAPA)."""
    query, keys, value = heads.query, heads.keys, heads.value
    key_span = slice(span.start + heads.offset, span.stop + heads.offset)
    # Without SG-BiMask only the scoring rows of the causal mask are ever needed.
    query_mask = (
        mask[rows_of, :, queries]
        if mask is not None
        else additive_mask(heads.attention_mask, query, keys.shape[2], queries)[rows_of]
    )
    value_norms = None
    if method.score == "contribution":
        values = repeat_kv(value[rows_of, :, key_span], heads.module.num_key_value_groups)
        value_norms = values.float().norm(dim=-1)
    return ops.received_attention(
        query[rows_of, :, queries], keys[rows_of], query_mask, heads.scaling, key_span, value_norms=value_norms
    )


def stage_importance(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    past_keys: torch.Tensor | None,
    real: torch.Tensor | None,
) -> torch.Tensor:
    """The attention the last token would pay every key of decoder `layer` if the tokens entering
    it, `hidden` (B, N, d), all went on: the layer's own input norm, q and k projections (q_norm /
    k_norm where the family has them) and rotary at the tokens' current positions, the keys its
    cache holds from earlier calls (`past_keys`, RoPE applied) first. As PyramidDrop's ranking
    computes it: every row projected, q.k / sqrt(head_dim), softmax in float32 cast back, key
    heads repeated for grouped-query attention, averaged over heads. `real` (B, kv) marks the keys
    that are not padding (None: all are). Returns (B, kv)."""
    module = layer.self_attn
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    shape = (batch, length, -1, module.head_dim)
    query = module.q_proj(normed).view(shape)
    key = module.k_proj(normed).view(shape)
    if hasattr(module, "q_norm") and hasattr(module, "k_norm"):
        query, key = module.q_norm(query), module.k_norm(key)
    rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
    query, key = rotary(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)
    if past_keys is not None:
        key = torch.cat([past_keys, key], dim=2)
    keys = repeat_kv(key, module.num_key_value_groups)
    logits = torch.matmul(query[:, :, -1:], keys.transpose(2, 3)) / math.sqrt(module.head_dim)
    if real is not None:
        logits = logits.masked_fill(~real[:, None, None, :], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return probs.mean(dim=1)[:, 0]


def register() -> str:
    """Register the attention function, and the SDPA mask builder under the same name (without
    it transformers would silently drop padding masks). Idempotent."""
    AttentionInterface.register(ATTENTION_NAME, asap_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
