"""VisPruner (Zhang et al., ICCV 2025): before the language model, keep the patches the vision
tower's [CLS] token attends to most (a share `important_ratio` of the budget), then fill the
rest of the budget with patches that are not near-duplicates of one another (rounds of
similarity matching on the pre-projector features). It reads the vision tower, not the
language model: the block taps the tower's feature layer for it (engine/vision.py). On
LLaVA-NeXT each tile keeps its own share and the newline slots are all kept, as their code does."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import BY_SCORE, DIVERSE, KEPT, KEPT_DIVERSE, SELECTED, UNPRUNED, BeforeLLM, Selection, SpanView
from .tower import tower_image


@dataclass(frozen=True)
class VisPruner(BeforeLLM):
    name = "vispruner"
    colour = "#D55E00"
    reads_vision = True
    roles = (
        replace(BY_SCORE, label="most attended by [CLS]"),
        KEPT_DIVERSE,
        replace(UNPRUNED, label="newline slot, always kept"),
    )
    important_ratio: float = 0.5

    def budget_problem(self, k: int) -> str | None:
        return f"vispruner keeps at least 1 token: k must be at least 1, got {k}" if k < 1 else None

    def select(self, span: SpanView, k: int) -> Selection:
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        from .. import ops

        image = tower_image(span, k, self)
        kept, roles = [image.newlines], [KEPT] * image.newlines.numel()
        for item in image.items:
            important, rest = ops.most_attended(item.cues.attention, int(image.budget * self.important_ratio))
            distinct = ops.without_duplicates(item.cues.features, rest, image.budget - important.numel())
            for patches, role in ((important, SELECTED), (distinct, DIVERSE)):
                kept.append(item.in_span(patches))
                roles += [role] * kept[-1].numel()
        kept, order = torch.cat(kept).sort()
        kept = kept.to(span.hidden.device)
        return Selection(kept=kept, hidden=span.hidden[kept], roles=[roles[i] for i in order.tolist()])
