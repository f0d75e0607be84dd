"""The interface every pruning method implements."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SpanView:
    """What the decoder saw of one image span at the last dense layer (L-1).

    start is the position of the span's first token in its own sequence (padding of a batch
    not counted). hidden (n, d) is that layer's output for the span's tokens. The scores are present only when
    the method asked for them: importance (n,) is the attention each token received from the
    method's query rows; mass (n,) is the raw attention mass s (Eq. 2) and saliency (n,) its
    min-max normalisation s_hat (Eq. 3).
    """

    start: int
    hidden: torch.Tensor
    importance: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    saliency: torch.Tensor | None = None


@dataclass(frozen=True)
class SpanScores:
    """What the attention function measured for one span at layer L-1, each (1, n) or None
    where the method did not ask for it: the attention received from the method's query rows,
    the raw attention mass s (Eq. 2) and its min-max normalisation s_hat (Eq. 3)."""

    importance: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    saliency: torch.Tensor | None = None


# Why a kept token was kept (its role), for reports and figures; the numbers never depend on it.
SELECTED = "selected"  # ranked in by the method's own criterion: attention, diversity, chance
ANCHOR = "anchor"  # ASAP: a selected token that absorbed similar selected ones (Eq. 6)
REFILLED = "refilled"  # ASAP: taken from the pruned pool into a slot an absorbed token freed
POOLED = "pooled"  # pool: the average of one cell of the grid
KEPT = "kept"  # a span that was not pruned: every token goes on
ROLES = (SELECTED, ANCHOR, REFILLED, POOLED, KEPT)


@dataclass(frozen=True)
class Selection:
    """The k tokens of a span that go on past layer L-1: indices into the span, ascending, and
    the hidden states they carry (changed only where a method merges tokens).

    `roles` names why each kept token was kept (None: all SELECTED); `absorbed` lists, for each
    kept token, the other span indices whose states it now carries (an anchor's merged tokens, a
    pooled cell's other patches; None: none anywhere)."""

    kept: torch.Tensor
    hidden: torch.Tensor
    merged: int = 0
    roles: list[str] | None = None
    absorbed: list[list[int]] | None = None

    def token_roles(self) -> list[str]:
        return list(self.roles) if self.roles is not None else [SELECTED] * self.kept.numel()

    def token_absorbed(self) -> list[list[int]]:
        return [list(a) for a in self.absorbed] if self.absorbed is not None else [[] for _ in range(self.kept.numel())]


class PruningMethod:
    """One visual-token pruning method. Subclasses set the class flags and implement `select`.

    The flags tell the decoder what to compute in layers 0..L-1:
    - `prunes`: False only for the vanilla reference.
    - `sg_bimask`: replace the causal mask inside image spans by SG-BiMask (Eq. 4-5).
    - `score_queries`: which query rows rank the tokens at layer L-1 ("last", "text", "all"),
      or None when the method needs no attention scores.
    - `needs_mass`: record s and s_hat at layer L-1.
    - `before_llm`: prune the projected visual features before decoder layer 0 instead of after
      layer L-1 (the plan's layer is 0 whatever L the user gave). Kept tokens keep their
      original positions, as with every method here: generate() numbers the decoding steps
      from the full prompt.
    - `score`: "attention" ranks by the attention probability received; "contribution" weights
      it by the norm of the token's value vector (CAPA).
    """

    name: ClassVar[str]
    prunes: ClassVar[bool] = True
    sg_bimask: ClassVar[bool] = False
    needs_mass: ClassVar[bool] = False
    before_llm: ClassVar[bool] = False
    score_queries: str | None = None
    score: str = "attention"
    lambda_max: float = 1.0

    @classmethod
    def hyperparameters(cls) -> list[str]:
        """The hyperparameters this method takes: its fields that are declared ones, in the
        declarations' order."""
        from .hyperparameters import HYPERPARAMETERS

        own = {field.name for field in fields(cls)} if hasattr(cls, "__dataclass_fields__") else set()
        return [name for name in HYPERPARAMETERS if name in own]

    def kept_count(self, tokens: int, k: int) -> int:
        """How many of a span's `tokens` go on at budget k."""
        return min(tokens, k)

    def select(self, span: SpanView, k: int) -> Selection:
        raise NotImplementedError
