"""The attention function registered with transformers for the language model.

It receives query and key after RoPE (transformers' AttentionInterface contract). Outside a
pruning prefill, and in layers >= L, it is transformers' own SDPA function unchanged. In layers
0..L-1 of a pruning prefill it computes the attention mass of each image span (Eq. 2), swaps the
causal mask for SG-BiMask inside the spans when the method asks for it (Eq. 4-5), and at layer
L-1 records the attention each visual token receives. The output always comes from SDPA: the
only N x N tensor it builds is the additive mask, as any masked SDPA call does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import ops
from .methods import SpanScores

if TYPE_CHECKING:
    from .decoder import PrunePass

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
    layer = module.layer_idx
    if prune_pass is None or layer >= prune_pass.layer:
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    method = prune_pass.method
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    offset = kv_len - q_len  # the chunk's queries are the last q_len keys
    keys = repeat_kv(key, module.num_key_value_groups)
    is_scoring_layer = layer == prune_pass.layer - 1
    need_mass = method.sg_bimask or (is_scoring_layer and method.needs_mass)

    mask = additive_mask(attention_mask, query, kv_len) if method.sg_bimask else None
    for index, (row, span) in enumerate(prune_pass.spans):
        key_span = slice(span.start + offset, span.stop + offset)
        rows_of = slice(row, row + 1)  # this span's batch row
        mass = saliency = None
        if need_mass:
            mass = ops.attention_mass(query[rows_of, :, span], keys[rows_of, :, key_span], scaling)
            saliency = ops.min_max(mass)
        if method.sg_bimask:
            mask[rows_of, :, span, key_span] = ops.sg_bimask(saliency, method.lambda_max)[:, None].to(mask.dtype)
        if is_scoring_layer:
            importance = None
            if method.score_queries:
                queries = score_rows(method.score_queries, span, q_len)
                # Without SG-BiMask only the scoring rows of the causal mask are ever needed.
                query_mask = (
                    mask[rows_of, :, queries]
                    if mask is not None
                    else additive_mask(attention_mask, query, kv_len, queries)[rows_of]
                )
                value_norms = None
                if method.score == "contribution":
                    values = repeat_kv(value[rows_of, :, key_span], module.num_key_value_groups)
                    value_norms = values.float().norm(dim=-1)
                importance = ops.received_attention(
                    query[rows_of, :, queries], keys[rows_of], query_mask, scaling, key_span, value_norms=value_norms
                )
            prune_pass.record(index, SpanScores(importance=importance, mass=mass, saliency=saliency))

    if method.sg_bimask:
        attention_mask = mask
    return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register() -> str:
    """Register the attention function, and the SDPA mask builder under the same name (without
    it transformers would silently drop padding masks). Idempotent."""
    AttentionInterface.register(ATTENTION_NAME, asap_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
