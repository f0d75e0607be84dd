"""VisionZip (Yang et al., CVPR 2025): before the language model, keep the [CLS] token and the
patches it attends to most (the dominant tokens), and merge the rest into a few contextual
tokens grouped by the similarity of their keys; both on the pre-projector features of the vision
tower's feature layer, then the projector. Their authors feed the dominant tokens first, then the
contextual ones: the selection's `order` (renumbered) follows them. On LLaVA-NeXT each tile is
compressed alone with the per-tile budget and the tokens are fed in their code's order
(engine/methods/tower.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ...errors import UsageError
from .base import BY_SCORE, GLOBAL, GLOBAL_TOKEN, SELECTED, BeforeLLM, Role, Selection, SpanView
from .tower import Fed, TowerItem, tower_image

if TYPE_CHECKING:
    import torch

CONTEXTUAL = "contextual"  # a target patch with the patches grouped with it merged in
CONTEXTUAL_TOKEN = Role(CONTEXTUAL, "contextual: a group of patches merged", "#56B4E9")
PER_64 = 10  # contextual tokens per 64 of k: the authors' 54 + 10, 108 + 20, 162 + 30


def contextual_count(k: int, given: int | None) -> int:
    """How many of k tokens are contextual: `given`, else 10 per 64 of k rounded half up, at least
    1 and at most k - 1 (the [CLS] token is always one of the dominant ones)."""
    if given is not None:
        return given
    return min(max(1, (PER_64 * k + 32) // 64), k - 1)


@dataclass(frozen=True)
class VisionZip(BeforeLLM):
    name = "visionzip"
    colour = "#332288"
    reads_vision = True
    vision_needs = ("keys", "project")
    roles = (
        replace(BY_SCORE, label="dominant: most attended by [CLS]"),
        CONTEXTUAL_TOKEN,
        replace(GLOBAL_TOKEN, label="the [CLS] token, in a dropped patch's slot"),
    )
    contextual: int | None = None

    def budget_problem(self, k: int) -> str | None:
        if k < 2:
            return f"visionzip keeps the [CLS] token and at least one contextual token: k must be at least 2, got {k}"
        if self.contextual is not None and self.contextual > k - 1:
            return (
                f"contextual must be at most k - 1 = {k - 1} (the [CLS] token is one of the k dominant ones), "
                f"got {self.contextual}"
            )
        return None

    def select(self, span: SpanView, k: int) -> Selection:
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        problem = self.budget_problem(k)
        if problem:
            raise UsageError(problem)
        image = tower_image(span, k, self)
        first, *tiles = [self._item(item, image.budget, span) for item in image.items]
        fed = [first.cls, first.dominant, first.contextual]
        if tiles:  # theirs on LLaVA-NeXT: then every tile's dominant patches read row by row across
            # the tiles' canvas, every tile's [CLS], every tile's contextual tokens; no newline slot
            dominant = Fed.joined([tile.dominant for tile in tiles])
            fed += [dominant.sorted_by(torch.cat([tile.canvas for tile in tiles]))]
            fed += [tile.cls for tile in tiles] + [tile.contextual for tile in tiles]
        fed = Fed.joined(fed)
        return fed.selection(span, merged=sum(map(len, fed.absorbed)))

    def _item(self, item: TowerItem, budget: int, span: SpanView) -> _Item:
        """One item's tokens: its [CLS], its dominant patches (in patch order) and its contextual
        tokens; the new tokens projected, a dominant patch that reaches the span with the model's
        own projection of it (the projector maps each token alone)."""
        import torch

        from .. import ops

        cues = item.cues
        contextual = contextual_count(budget, self.contextual)
        dominant, rest = ops.dominant_patches(cues.attention, budget - contextual - 1)
        targets, others, assignment = ops.context_groups(cues.keys[1:][rest], contextual)
        merged = ops.merge_into_targets(cues.features[rest], targets, others, assignment)
        device, dtype = span.hidden.device, span.hidden.dtype
        new = cues.project(torch.cat([cues.cls[None], merged])).to(device, dtype)
        own = item.slots[dominant.to(item.slots.device)]
        kept = span.hidden[own.clamp(min=0).to(device)]  # a copy: the model's own projections
        cut = own < 0  # a tile's patch unpadding cut has none: projected here
        if cut.any():
            kept[cut.to(device)] = cues.project(cues.features[dominant[cut.to(dominant.device)]]).to(device, dtype)
        members = [item.in_span(rest[others[assignment == target]]).tolist() for target in range(contextual)]
        claims = item.slots[rest[targets].to(item.slots.device)].tolist()
        return _Item(
            cls=Fed([-1], new[:1], [GLOBAL], [[]]),
            dominant=Fed(own.tolist(), kept, [SELECTED] * dominant.numel()),
            contextual=Fed(claims, new[1:], [CONTEXTUAL] * contextual, members),
            canvas=None if item.canvas is None else item.canvas[dominant.to(item.canvas.device)],
        )


@dataclass(frozen=True)
class _Item:
    """One tower item's tokens, in the three parts their code feeds apart on LLaVA-NeXT."""

    cls: Fed
    dominant: Fed
    contextual: Fed
    canvas: torch.Tensor | None  # the dominant patches' places on the tiles' canvas
