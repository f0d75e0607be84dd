"""LLaVA-PruMerge+ (Shang et al., ICCV 2025): before the language model, keep the patches the
vision tower's [CLS] token attends to most (by the last layer's q and k, one head over the full
width) and spatially uniform samples; each kept token absorbs its 32 nearest patches by key
similarity, weighted by their attention, and one extra token, the attention-weighted sum of the
patches left out, goes last. All on the pre-projector features, then the projector. Their
authors feed the tokens in that order (most attended first, then the samples, then the extra
token): the selection's `order` (renumbered) follows them.

-k keeps exactly k tokens by default (a budget-matched form of their fixed path); `--adaptive`
runs their adaptive path (IQR outliers), whose count is the image's, whatever k."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import BY_SCORE, GLOBAL, GLOBAL_TOKEN, SELECTED, BeforeLLM, Role, Selection, SpanView
from .vispruner import tower_cues

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

    def select(self, span: SpanView, k: int) -> Selection:
        import torch  # at call time: the registry imports without torch (methods/__init__.py)

        from .. import ops

        cues = tower_cues(span, self.name)
        query, key = cues.query_key
        scores = ops.cls_row_attention(query, key)
        top, samples = ops.adaptive_picks(scores) if self.adaptive else ops.budget_picks(scores, k - 1)
        picked = torch.cat([top, samples])
        rest = ops.left_out(picked, scores.shape[0])
        merged, near = ops.merge_neighbours(cues.features, key[1:], scores, picked, rest)
        # The extra token; none where every patch was picked (their adaptive path at a quarter of
        # outliers: a zero token with no slot left for it).
        extra = (cues.features[rest] * scores[rest, None]).sum(dim=0, keepdim=True)[: min(1, rest.numel())]
        hidden = cues.project(torch.cat([merged, extra])).to(span.hidden.device, span.hidden.dtype)
        slots = _slots(picked, span.hidden.shape[0])[: hidden.shape[0]]
        roles = [SELECTED] * top.numel() + [SAMPLED] * samples.numel() + [GLOBAL] * extra.shape[0]
        absorbed = [*near, rest.tolist()][: hidden.shape[0]]
        kept, placed = slots.sort()
        return Selection(
            kept=kept.to(span.hidden.device),
            hidden=hidden[placed.to(hidden.device)],
            merged=rest.numel(),
            roles=[roles[i] for i in placed.tolist()],
            absorbed=[absorbed[i] for i in placed.tolist()],
            order=placed.argsort(),
        )


def _slots(picked, tokens: int):
    """Where each token sits, in their order: a picked patch at its own slot the first time; a
    repeat (their fixed path samples a top patch again) and then the extra token at the lowest
    slots no other token takes."""
    import torch

    first = torch.zeros(picked.numel(), dtype=torch.bool)
    seen: set[int] = set()
    for i, patch in enumerate(picked.tolist()):
        first[i] = patch not in seen
        seen.add(patch)
    free = [slot for slot in range(tokens) if slot not in seen]
    needing = (~first).nonzero().flatten().tolist() + [picked.numel()]
    slots = torch.cat([picked.cpu(), torch.zeros(1, dtype=torch.long)])
    for place, slot in zip(needing, free):
        slots[place] = slot
    return slots.to(picked.device)
