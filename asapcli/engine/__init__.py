"""The pruning engine: install the pruned decoder into a transformers LVLM, find image spans,
plan a pruning prefill. Knows nothing of the CLI."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from . import attention
from .decoder import PrunedDecoder, PruningPlan
from .methods import METHODS, SCORE_QUERIES, SCORES, PruningMethod

__all__ = [
    "METHODS",
    "SCORES",
    "SCORE_QUERIES",
    "PrunedDecoder",
    "PruningMethod",
    "PruningPlan",
    "image_spans",
    "install",
    "make_method",
]


def install(model: PreTrainedModel) -> PrunedDecoder:
    """Route the language model through `PrunedDecoder` and the registered attention function.
    Only the text model's attention changes; the vision tower keeps its own. Idempotent."""
    decoder = model.get_decoder()
    if isinstance(decoder, PrunedDecoder):
        return decoder
    name = attention.register()
    has_text_config = "text_config" in model.config.sub_configs
    model.set_attn_implementation({"text_config": name} if has_text_config else name)
    pruned = PrunedDecoder(decoder)
    model.set_decoder(pruned)
    return pruned


def image_spans(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of every contiguous run of image tokens in one sequence (1-D ids). One run is
    one image: LLaVA-NeXT's tiles and newline slots all carry the image token id."""
    is_image = torch.cat([torch.zeros(1, dtype=torch.int8), (input_ids == image_token_id).to(torch.int8).cpu()])
    edges = torch.diff(torch.cat([is_image, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return list(zip(starts, ends))


def make_method(name: str, **options) -> PruningMethod:
    """A method instance from its registry name, with the options it understands."""
    cls = METHODS[name]
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(**{key: value for key, value in options.items() if key in fields and value is not None})
