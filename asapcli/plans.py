"""PruningPlan construction: the plan that prunes a prompt's image spans as PruneSettings say,
and what a plan keeps."""

from __future__ import annotations

import torch

from .engine import PruningPlan, image_spans, make_method
from .loading import Loaded
from .settings import PruneSettings


def plan_for(loaded: Loaded, input_ids: torch.Tensor, settings: PruneSettings, since: int = 0) -> PruningPlan:
    """The plan for the image spans of `input_ids` (one sequence) at positions >= `since`."""
    settings.check(loaded.num_layers)
    spans = [span for span in image_spans(input_ids, loaded.image_token_id) if span[0] >= since]
    return make_plan(settings, spans)


def plans_for_batch(loaded: Loaded, input_ids: torch.Tensor, settings: PruneSettings) -> list[PruningPlan]:
    """One plan per row of a (left-padded) batch of sequences (B, N): each row its own spans."""
    return [plan_for(loaded, row, settings) for row in input_ids]


def make_plan(settings: PruneSettings, spans: list[tuple[int, int]]) -> PruningPlan:
    """The plan that prunes `spans` ([start, end) token positions) as `settings` say."""
    method = make_method(settings.method, seed=settings.seed, **settings.hyperparameters)
    layer = 0 if method.before_llm else settings.layer
    return PruningPlan(
        method=method, k=settings.k, layer=layer, spans=spans, renumber=getattr(method, "positions", None) == "renumber"
    )


def token_counts(plan: PruningPlan) -> tuple[int, int]:
    """Visual tokens in the plan's spans, and how many of them go past layer L-1."""
    sizes = [end - start for start, end in plan.spans]
    if not plan.method.prunes:
        return sum(sizes), sum(sizes)
    return sum(sizes), sum(plan.method.kept_count(size, plan.k) for size in sizes)
