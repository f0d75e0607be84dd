"""VisPruner (Zhang et al., ICCV 2025): before the language model, keep the patches the vision
tower's [CLS] token attends to most (a share `important_ratio` of the budget), then fill the
rest of the budget with patches that are not near-duplicates of one another (rounds of
similarity matching on the pre-projector features). It reads the vision tower, not the
language model: the block taps the tower's feature layer for it (engine/vision.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import UsageError
from .base import BY_SCORE, DIVERSE, KEPT_DIVERSE, SELECTED, BeforeLLM, Selection, SpanView


@dataclass(frozen=True)
class VisPruner(BeforeLLM):
    name = "vispruner"
    colour = "#D55E00"
    reads_vision = True
    roles = (replace(BY_SCORE, label="most attended by [CLS]"), KEPT_DIVERSE)
    important_ratio: float = 0.5

    def select(self, span: SpanView, k: int) -> Selection:
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        from .. import ops

        cues = tower_cues(span, self.name)
        important, rest = ops.most_attended(cues.attention, int(k * self.important_ratio))
        distinct = ops.without_duplicates(cues.features, rest, k - important.numel())
        kept, order = torch.cat([important, distinct]).to(span.hidden.device).sort()
        roles = [SELECTED if place < important.numel() else DIVERSE for place in order.tolist()]
        return Selection(kept=kept, hidden=span.hidden[kept], roles=roles)


def tower_cues(span: SpanView, method: str):
    """What the vision tower gave for the span's image (engine/vision.py's VisionCues), checked to
    be one patch per token of the span."""
    cues = span.vision
    if cues is None:
        raise UsageError(f"{method} reads the vision tower's [CLS] attention: prune with it inside asapcli.pruned")
    if cues.features.shape[0] != span.hidden.shape[0]:
        raise UsageError(
            f"{method}: the vision tower gave {cues.features.shape[0]} patches for an image span of "
            f"{span.hidden.shape[0]} tokens"
        )
    return cues
