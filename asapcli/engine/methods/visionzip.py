"""VisionZip (Yang et al., CVPR 2025): before the language model, keep the [CLS] token and the
patches it attends to most (the dominant tokens), and merge the rest into a few contextual
tokens grouped by the similarity of their keys; both on the pre-projector features of the vision
tower's feature layer, then the projector. Their authors feed the dominant tokens first, then the
contextual ones: the selection's `order` (renumbered) follows them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import UsageError
from .base import BY_SCORE, GLOBAL, GLOBAL_TOKEN, SELECTED, BeforeLLM, Role, Selection, SpanView
from .vispruner import tower_cues

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

        from .. import ops

        problem = self.budget_problem(k)
        if problem:
            raise UsageError(problem)
        cues = tower_cues(span, self.name)
        contextual = contextual_count(k, self.contextual)
        dominant, rest = ops.dominant_patches(cues.attention, k - contextual - 1)
        targets, others, assignment = ops.context_groups(cues.keys[1:][rest], contextual)
        merged = ops.merge_into_targets(cues.features[rest], targets, others, assignment)
        # The authors' order: [CLS], dominant, contextual. The dominant patches keep the model's own
        # projection of them (the projector maps each token alone); only new tokens are projected.
        new = cues.project(torch.cat([cues.cls[None], merged])).to(span.hidden.device, span.hidden.dtype)
        hidden = torch.cat([new[:1], span.hidden[dominant.to(span.hidden.device)], new[1:]])
        slots = torch.cat([_free_slot(span.hidden.shape[0], dominant, rest[targets]), dominant, rest[targets]])
        members = [rest[others[assignment == target]].tolist() for target in range(contextual)]
        roles = [GLOBAL] + [SELECTED] * dominant.numel() + [CONTEXTUAL] * contextual
        absorbed = [[]] + [[] for _ in range(dominant.numel())] + members
        kept, placed = slots.sort()
        return Selection(
            kept=kept.to(span.hidden.device),
            hidden=hidden[placed.to(hidden.device)],
            merged=sum(len(m) for m in members),
            roles=[roles[i] for i in placed.tolist()],
            absorbed=[absorbed[i] for i in placed.tolist()],
            order=placed.argsort(),
        )


def _free_slot(tokens: int, *taken):
    """The [CLS] token's slot: the first patch no other kept token sits on (k < n leaves one)."""
    import torch

    used = torch.zeros(tokens, dtype=torch.bool)
    for indices in taken:
        used[indices.cpu()] = True
    return (~used).nonzero().flatten()[:1].to(taken[0].device)
