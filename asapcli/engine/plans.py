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
    method object as it is (made and checked once, with the settings), from its first pruning
    layer, by its schedule for the model the settings were checked against."""
    method = settings.method
    return PruningPlan(
        method=method,
        k=settings.k,
        layer=settings.first_layer,
        spans=spans,
        renumber=method.renumbers,
        num_layers=settings.num_layers,
    )


def token_counts(plan: PruningPlan) -> tuple[int, int]:
    """Visual tokens in the plan's spans, and how many of them go past its last pruning step."""
    sizes = [end - start for start, end in plan.spans]
    kept = [steps[-1][1] if steps else end - start for start, end, steps in _span_steps(plan)]
    return sum(sizes), sum(kept)


def k_unmet(plan: PruningPlan) -> str | None:
    """Why the plan keeps another count than k per image (an image at or under k kept whole),
    where it does: the method's own rule of what k means; None where it keeps what k asks."""
    if not plan.method.prunes or not plan.spans:
        return None
    asked = sum(min(plan.k, end - start) for start, end in plan.spans)
    _, kept = token_counts(plan)
    if kept == asked:
        return None
    return plan.method.k_rule() or "on a tiling model k is split among an image's tower items, in whole tokens"


def first_layer(plan: PruningPlan) -> int:
    """L as the plan pruned: the layer of its first step (a method in stages, matched to the
    budget, may start before its nominal stages); the plan's own L where nothing was pruned."""
    steps = visual_steps(plan)
    return steps[0][0] if steps else plan.layer


def visual_steps(plan: PruningPlan) -> list[tuple[int, int]]:
    """The plan's schedule over all its spans: (layer, visual tokens left from it on), one step per
    layer where a span loses tokens; what Eq. 7 counts (schedule.visual_flops)."""
    spans = _span_steps(plan)
    layers = sorted({layer for _, _, steps in spans for layer, _ in steps})
    return [(layer, sum(_left(start, end, steps, layer) for start, end, steps in spans)) for layer in layers]


def _span_steps(plan: PruningPlan) -> list[tuple[int, int, list[tuple[int, int]]]]:
    return [(start, end, plan.steps(start, end)) for start, end in plan.spans]


def _left(start: int, end: int, steps: list[tuple[int, int]], layer: int) -> int:
    """The tokens of the span [start, end) that `layer` holds under `steps`."""
    return min([end - start] + [count for at, count in steps if at <= layer])
