"""What the methods that read the vision tower (VisPruner, VisionZip, PruMerge+) share: the span's
image item by item as the tower saw it, where each item's patches sit in the span, the budget each
item keeps, and the rule that gives a slot to each token they feed.

On LLaVA-1.5 an image is one item: a grid of N patches, one per token of the span. On LLaVA-NeXT
it is the base image and each tile, pruned one by one as their authors' code prunes each item of
the tower's batch, each with their per-item budget k // most_items (TiledCues, which
engine/vision.py fills); a tile's patch reaches the span only where the model's unpadding kept
it, and the newline slots show no patch."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import UsageError
from .base import KEPT, PruningMethod, Selection, SpanView

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TiledCues:
    """One image of a tiling model (LLaVA-NeXT) as the tower saw it: `items`, the cues of its base
    image, then of its tiles (the model's order, row by row); `source` (the span's tokens,), the
    item * N + patch each token of the image span shows, -1 for a newline slot; `grid`, the tiles'
    (rows, cols); `most_items`, the most items an image of this model has (1 + the most tiles of
    its grid pinpoints): the authors' budget is per item, k // most_items (VisPruner's
    "32 * 5 = 160 tokens")."""

    items: list  # engine/vision.py's VisionCues
    source: torch.Tensor
    grid: tuple[int, int]
    most_items: int


@dataclass(frozen=True)
class TowerItem:
    """One item of the tower's batch: its `cues` (engine/vision.py's VisionCues); `slots` (N,),
    the span index of each patch, -1 where the model's unpadding cut it; `canvas` (N,), for a
    tile, each patch's place on the canvas of all tiles read row by row (None for the base image
    or a single grid)."""

    cues: object
    slots: torch.Tensor
    canvas: torch.Tensor | None = None

    def in_span(self, patches: torch.Tensor) -> torch.Tensor:
        """The span indices of those of `patches` that reach the span."""
        slots = self.slots[patches.to(self.slots.device)]
        return slots[slots >= 0]


@dataclass(frozen=True)
class TowerImage:
    """The span's image: its `items` in the model's order, the tokens each keeps (`budget`) and
    the span indices of its newline slots (none on a single grid)."""

    items: list[TowerItem]
    budget: int
    newlines: torch.Tensor


def tower_image(span: SpanView, k: int, method: PruningMethod) -> TowerImage:
    """What the vision tower gave for the span's image, item by item, each item's budget checked
    against what `method` can keep."""
    import torch

    cues = span.vision
    if cues is None:
        raise UsageError(f"{method} reads the vision tower's [CLS] attention: prune with it inside asapcli.pruned")
    if not isinstance(cues, TiledCues):  # one grid: one patch per token of the span
        if cues.features.shape[0] != span.hidden.shape[0]:
            raise UsageError(
                f"{method}: the vision tower gave {cues.features.shape[0]} patches for an image span of "
                f"{span.hidden.shape[0]} tokens"
            )
        return TowerImage([TowerItem(cues, torch.arange(span.hidden.shape[0]))], k, torch.zeros(0, dtype=torch.long))
    patches = cues.items[0].features.shape[0]
    problem = tiled_budget_problem(method, k, cues.most_items, patches)
    if problem:
        raise UsageError(problem)
    return TowerImage(_tiles(cues), min(k // cues.most_items, patches), (cues.source < 0).nonzero().flatten())


def tiled_budget_problem(method: PruningMethod, k: int, most: int, patches: int) -> str | None:
    """Why budget k cannot prune an image of a tiling model with `method`, which gives each of its
    up to `most` tower items of `patches` patches k // most tokens (a larger share keeps them all:
    VisionZip could not split more); None where it can. Told from the model's config alone, so
    asked before the model loads (tiling_of) and again as each image is pruned."""
    budget = min(k // most, patches)
    if not method.budget_problem(budget):
        return None
    least = next(t for t in itertools.count(budget + 1) if method.budget_problem(t) is None)
    fix = f"give k at least {least * most}" if least <= patches else f"an item has only {patches} patches"
    return (
        f"{method} on a tiled model gives each of an image's up to {most} tower items (the base image and its "
        f"tiles) k // {most} tokens: {budget} at k = {k}, where it needs {least}; {fix}"
    )


def _tiles(cues) -> list[TowerItem]:
    """Each item of a TiledCues with its patches' span slots and, for the tiles, canvas places."""
    import torch

    patches = cues.items[0].features.shape[0]
    side = math.isqrt(patches)
    slot_of = torch.full((len(cues.items) * patches,), -1, dtype=torch.long)
    shown = (cues.source >= 0).nonzero().flatten()
    slot_of[cues.source[shown]] = shown
    row, col = torch.arange(patches).div(side, rounding_mode="floor"), torch.arange(patches) % side
    width = cues.grid[1] * side
    items = [TowerItem(cues.items[0], slot_of[:patches])]
    for tile in range(1, len(cues.items)):
        tile_row, tile_col = divmod(tile - 1, cues.grid[1])
        canvas = (tile_row * side + row) * width + tile_col * side + col
        items.append(TowerItem(cues.items[tile], slot_of[tile * patches : (tile + 1) * patches], canvas))
    return items


def claim_slots(claims: list[int], tokens: int) -> list[int]:
    """The slot of each token fed, in the authors' order: a token that stands for a patch of the
    span (`claims`: its span index; -1 for none: a [CLS] or extra token, a patch unpadding cut)
    takes that slot unless an earlier token did; each other token takes the lowest slot no token
    takes, in order."""
    taken: set[int] = set()
    slots = []
    for claim in claims:
        own = claim >= 0 and claim not in taken
        slots.append(claim if own else -1)
        if own:
            taken.add(claim)
    free = iter(slot for slot in range(tokens) if slot not in taken)
    return [slot if slot >= 0 else next(free) for slot in slots]


@dataclass(frozen=True)
class Fed:
    """Tokens fed to the language model in their authors' order: the span index each stands for
    (`claims`, -1: none), their states, roles and the span indices each absorbed."""

    claims: list[int]
    hidden: torch.Tensor
    roles: list[str]
    absorbed: list[list[int]] | None = None

    def __post_init__(self):
        if self.absorbed is None:
            object.__setattr__(self, "absorbed", [[] for _ in self.claims])
        if not len(self.claims) == self.hidden.shape[0] == len(self.roles) == len(self.absorbed):
            raise ValueError(
                f"tokens fed out of step: {len(self.claims)} claims, {self.hidden.shape[0]} states, "
                f"{len(self.roles)} roles, {len(self.absorbed)} absorbed lists"
            )

    @staticmethod
    def joined(parts: list[Fed]) -> Fed:
        import torch

        return Fed(
            [claim for part in parts for claim in part.claims],
            torch.cat([part.hidden for part in parts]),
            [role for part in parts for role in part.roles],
            [absorbed for part in parts for absorbed in part.absorbed],
        )

    def sorted_by(self, keys: torch.Tensor) -> Fed:
        order = keys.argsort().tolist()
        pick = lambda values: [values[i] for i in order]
        return Fed(pick(self.claims), self.hidden[order], pick(self.roles), pick(self.absorbed))

    def selection(self, span: SpanView, merged: int) -> Selection:
        """These tokens, each at its slot (claim_slots); renumbered, they keep this order
        (Selection.order)."""
        import torch

        tokens = span.hidden.shape[0]
        if len(self.claims) >= tokens:  # an adaptive count (PruMerge+'s, per tile) can reach the span's
            return Selection(
                kept=torch.arange(tokens, device=span.hidden.device), hidden=span.hidden, roles=[KEPT] * tokens
            )
        slots = torch.tensor(claim_slots(self.claims, tokens), dtype=torch.long)
        kept, placed = slots.sort()
        return Selection(
            kept=kept.to(span.hidden.device),
            hidden=self.hidden[placed.to(self.hidden.device)],
            merged=merged,
            roles=[self.roles[i] for i in placed.tolist()],
            absorbed=[self.absorbed[i] for i in placed.tolist()],
            order=placed.argsort(),
        )
