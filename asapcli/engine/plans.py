"""The pruning plan: what one forward call prunes in one sequence, made from PruneSettings and
the sequence's image spans (`image_spans`). Immutable: what the decoder did comes back as
SpanRecords, kept by the session (engine/session.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .methods import PruningMethod
from .settings import PruneSettings


class LoadedModel(Protocol):
    """What a plan made by hand reads of a loaded model (runtime/loading.py's Loaded)."""

    num_layers: int
    image_token_id: int


@dataclass(frozen=True)
class PruningPlan:
    """What to prune in one sequence of a prefill: `spans` are [start, end) positions of image
    tokens in the whole token sequence (a chat's cached tokens counted). `layer` is L, the first
    layer that sees pruned spans: layers 0..L-1 see every token. Each span is pruned by the
    method's schedule (`steps`: one step at L for the single-layer methods, several for
    multi-stage ones, whose layers depend on the model's `num_layers`). A span the method would
    not shrink at budget k (k >= its tokens) runs exactly as vanilla: no SG-BiMask, no scoring,
    unless `score_only` asks for the scores (attention figures). `renumber` numbers the tokens
    left after each step afresh, as a pipeline that feeds the next layers fewer embeddings does
    (official DivPrune, PyramidDrop)."""

    method: PruningMethod
    k: int
    layer: int
    spans: tuple[tuple[int, int], ...]
    score_only: bool = False  # score every span at its first step as the method would, prune none
    renumber: bool = False  # kept tokens take positions 0..M-1 (a shorter prompt) instead of their own
    num_layers: int | None = None  # the model's decoder layers, where a multi-stage schedule needs them

    def __post_init__(self):
        object.__setattr__(self, "spans", tuple(tuple(span) for span in self.spans))

    def steps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The method's schedule for the span [start, end): (layer, tokens left from it on)."""
        if not self.method.prunes:
            return []
        return self.method.schedule(end - start, self.k, self.layer, self.num_layers)

    def shrinks(self, start: int, end: int) -> bool:
        """Whether the span [start, end) loses tokens at this budget; one that does not runs as vanilla
        (as every span does under vanilla, whatever its k)."""
        return bool(self.steps(start, end))

    def agrees_with(self, other: PruningPlan) -> bool:
        """Whether two rows of one batch prune alike (each names its own spans)."""
        return (self.method, self.k, self.layer, self.num_layers) == (
            other.method,
            other.k,
            other.layer,
            other.num_layers,
        )


def make_plan(settings: PruneSettings, spans: list[tuple[int, int]], *, score_only: bool = False) -> PruningPlan:
    """The plan that prunes `spans` ([start, end) token positions) as `settings` say: their
    method object as it is (made and checked once, with the settings), from its first pruning
    layer, by its schedule for the model the settings were checked against."""
    method = settings.method
    return PruningPlan(
        method=method,
        k=settings.k,
        layer=settings.first_layer,
        spans=spans,
        score_only=score_only,
        renumber=method.renumbers,
        num_layers=settings.num_layers,
    )


def plan_for(
    loaded: LoadedModel, input_ids: torch.Tensor, settings: PruneSettings, *, score_only: bool = False
) -> PruningPlan:
    """The plan for the image spans of `input_ids` (one sequence), made by hand for a session's
    next call (session.plan_next): the attention profile's score-only plans, tests. Answers go
    through `pruned_as`, whose session plans each forward call's spans itself."""
    settings = settings.for_model(loaded.num_layers)
    return make_plan(settings, image_spans(input_ids, loaded.image_token_id), score_only=score_only)


def image_spans(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of every contiguous run of image tokens in one sequence (1-D ids). One run is
    one image: LLaVA-NeXT's tiles and newline slots all carry the image token id."""
    is_image = torch.cat([torch.zeros(1, dtype=torch.int8), (input_ids == image_token_id).to(torch.int8).cpu()])
    edges = torch.diff(torch.cat([is_image, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return list(zip(starts, ends))
