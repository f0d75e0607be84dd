"""LLaVA-PruMerge+ (Shang et al., ICCV 2025): before the language model, keep the patches the
vision tower's [CLS] token attends to most (by the last layer's q and k, one head over the full
width) and spatially uniform samples; each kept token absorbs its 32 nearest patches by key
similarity, weighted by their attention, and one extra token, the attention-weighted sum of the
patches left out, goes last. All on the pre-projector features, then the projector. Their
authors feed the tokens in that order (most attended first, then the samples, then the extra
token): the selection's `order` (renumbered) follows them.

-k keeps exactly k tokens by default (a budget-matched form of their fixed path); `--adaptive`
runs their adaptive path (IQR outliers), whose count is the image's, whatever k. Given several
images of one sample (LLaVA-NeXT's base image and tiles), their code prunes each alone and feeds
the outputs one after the other: each tile keeps the per-tile budget (engine/methods/tower.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import BY_SCORE, GLOBAL, GLOBAL_TOKEN, SELECTED, BeforeLLM, Role, Selection, SpanView
from .tower import Fed, TowerItem, tower_image

SAMPLED = "sampled"  # a spatially uniform sample, kept whatever its attention
SAMPLED_TOKEN = Role(SAMPLED, "spatial sample", "#F0E442")


@dataclass(frozen=True)
class PruMergePlus(BeforeLLM):
    name = "prumerge-plus"
    colour = "#AA4499"
    reads_vision = True
    vision_needs = ("last_qk", "project")
    roles = (
        replace(BY_SCORE, label="most attended by [CLS], merged with its nearest"),
        SAMPLED_TOKEN,
        replace(GLOBAL_TOKEN, label="extra token: the left-out patches' weighted sum"),
    )
    adaptive: bool = False

    @property
    def counts_per_image(self) -> bool:
        return self.adaptive

    def k_rule(self) -> str | None:
        return "--adaptive keeps each image's own count (its outliers), whatever k" if self.adaptive else None

    def budget_problem(self, k: int) -> str | None:
        if k < 1 and not self.adaptive:  # adaptive: the image sets its count, whatever k
            return f"prumerge-plus keeps at least its extra token: k must be at least 1, got {k}"
        return None

    def select(self, span: SpanView, k: int) -> Selection:
        image = tower_image(span, k, self)
        # Theirs, given several items (LLaVA-NeXT's base image and tiles): each alone, the outputs
        # one after the other, base first; no newline slot.
        items = [self._item(item, image.budget, span) for item in image.items]
        return Fed.joined([fed for fed, _ in items]).selection(span, merged=sum(merged for _, merged in items))

    def _item(self, item: TowerItem, budget: int, span: SpanView) -> tuple[Fed, int]:
        """One item's tokens in their order: the picked patches, each with its nearest merged in,
        then the extra token; all projected. And how many of the span's tokens it merged."""
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        from .. import ops

        cues = item.cues
        query, key = cues.query_key
        scores = ops.cls_row_attention(query, key)
        top, samples = ops.adaptive_picks(scores) if self.adaptive else ops.budget_picks(scores, budget - 1)
        picked = torch.cat([top, samples])
        rest = ops.left_out(picked, scores.shape[0])
        merged, near = ops.merge_neighbours(cues.features, key[1:], scores, picked, rest)
        # The extra token; none where every patch was picked (their adaptive path at a quarter of
        # outliers: a zero token with no slot left for it).
        extra = (cues.features[rest] * scores[rest, None]).sum(dim=0, keepdim=True)[: min(1, rest.numel())]
        hidden = cues.project(torch.cat([merged, extra])).to(span.hidden.device, span.hidden.dtype)
        roles = [SELECTED] * top.numel() + [SAMPLED] * samples.numel() + [GLOBAL] * extra.shape[0]
        absorbed = [
            item.in_span(torch.tensor(patches, dtype=torch.long)).tolist() for patches in [*near, rest.tolist()]
        ]
        claims = item.slots[picked.to(item.slots.device)].tolist() + [-1] * extra.shape[0]
        return Fed(claims, hidden, roles, absorbed[: hidden.shape[0]]), item.in_span(rest).numel()
