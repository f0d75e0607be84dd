"""PruningPlan construction: the plan that prunes a prompt's image spans as PruneSettings say,
and what a plan keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import PruningPlan, image_spans
from .settings import PruneSettings

if TYPE_CHECKING:
    from ..runtime.loading import Loaded


def plan_for(loaded: Loaded, input_ids: torch.Tensor, settings: PruneSettings) -> PruningPlan:
    """The plan for the image spans of `input_ids` (one sequence), made by hand: the attention
    profile drives the engine with it (asking for scores only). Answers go through the API's
    block (engine/block.py), which plans each forward call's spans itself."""
    settings = settings.for_model(loaded.num_layers)
    return make_plan(settings, image_spans(input_ids, loaded.image_token_id))


def make_plan(settings: PruneSettings, spans: list[tuple[int, int]]) -> PruningPlan:
    """The plan that prunes `spans` ([start, end) token positions) as `settings` say: their
    method object as it is (made and checked once, with the settings), at its own layer."""
    method = settings.method
    return PruningPlan(
        method=method, k=settings.k, layer=method.pruning_layer(settings.layer), spans=spans, renumber=method.renumbers
    )


def token_counts(plan: PruningPlan) -> tuple[int, int]:
    """Visual tokens in the plan's spans, and how many of them go past layer L-1."""
    sizes = [end - start for start, end in plan.spans]
    if not plan.method.prunes:
        return sum(sizes), sum(sizes)
    return sum(sizes), sum(plan.method.kept_count(size, plan.k) for size in sizes)
