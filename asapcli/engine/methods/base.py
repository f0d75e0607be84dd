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
    min-max normalisation s_hat (Eq. 3). vision is what the vision tower gave for the span's image
    (engine/vision.py's VisionCues: its [CLS] attention and pre-projector patch features), present
    only for a method that declares `reads_vision`, inside a block.
    """

    start: int
    hidden: torch.Tensor
    importance: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    saliency: torch.Tensor | None = None
    vision: object | None = None


@dataclass(frozen=True)
class SpanScores:
    """What the attention function measured for one span at layer L-1, each (1, n) or None
    where the method did not ask for it: the attention received from the method's query rows,
    the raw attention mass s (Eq. 2) and its min-max normalisation s_hat (Eq. 3)."""

    importance: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    saliency: torch.Tensor | None = None


@dataclass(frozen=True)
class Role:
    """Why a kept token was kept, for reports and figures (the numbers never depend on it): `name`
    is what Selection.roles and --json hold, `label` the legend's words, `colour` its colour in
    the figures (Okabe-Ito, told apart by colour-blind readers too). A method lists the roles its
    selections give in `PruningMethod.roles`; a role has one colour whichever method gives it."""

    name: str
    label: str
    colour: str


SELECTED = "selected"  # ranked in by the method's own criterion: attention, chance
DIVERSE = "diverse"  # kept for being unlike the others (DivPrune, VisPruner's second part)
KEPT = "kept"  # a span that was not pruned: every token goes on
GLOBAL = "global"  # a token with no patch of its own (VisionZip's [CLS], PruMerge+'s extra token)
BY_SCORE = Role(SELECTED, "selected by score", "#0072B2")
KEPT_DIVERSE = Role(DIVERSE, "kept as a distinct patch", "#D55E00")
UNPRUNED = Role(KEPT, "kept (not pruned)", "#FFFFFF")
# It sits in a slot no other kept token takes (a dropped patch's): the figures draw it there.
GLOBAL_TOKEN = Role(GLOBAL, "global token, in a dropped patch's slot", "#000000")


@dataclass(frozen=True)
class Selection:
    """The k tokens of a span that go on past layer L-1: indices into the span, ascending, and
    the hidden states they carry (changed only where a method merges tokens).

    `roles` names why each kept token was kept (None: all SELECTED); `absorbed` lists, for each
    kept token, the other span indices whose states it now carries (an anchor's merged tokens, a
    pooled cell's other patches; None: none anywhere).

    `order` is the order the kept tokens take in the sequence when it is numbered afresh
    (--positions renumber), as indices into `kept`; None: the slots' order. A method whose
    authors feed the tokens in another order than the patches' gives it (VisionZip: the dominant
    tokens, then the contextual ones): renumbered, its tokens then reach the language model as
    the authors' do; with original positions each token stays at its slot."""

    kept: torch.Tensor
    hidden: torch.Tensor
    merged: int = 0
    roles: list[str] | None = None
    absorbed: list[list[int]] | None = None
    order: torch.Tensor | None = None

    def token_roles(self) -> list[str]:
        return list(self.roles) if self.roles is not None else [SELECTED] * self.kept.numel()

    def token_absorbed(self) -> list[list[int]]:
        return [list(a) for a in self.absorbed] if self.absorbed is not None else [[] for _ in range(self.kept.numel())]

    def in_sequence(self, renumber: bool) -> Selection:
        """The selection with its tokens in the order they take in the sequence: `order`'s when
        the kept tokens are numbered afresh, else the slots' (itself). `kept` then lists, for
        each place in that order, the span index of the token there (no longer ascending); the
        slots those tokens fill are still `kept` sorted."""
        if not renumber or self.order is None:
            return self
        order = self.order.tolist()
        return Selection(
            kept=self.kept[self.order],
            hidden=self.hidden[self.order.to(self.hidden.device)],
            merged=self.merged,
            roles=[self.token_roles()[i] for i in order],
            absorbed=[self.token_absorbed()[i] for i in order],
        )


# Every method class that names itself, by name, as their modules define them (methods/__init__.py
# imports every module of the package and orders them into METHODS).
REGISTERED: dict[str, type[PruningMethod]] = {}


class PruningMethod:
    """One visual-token pruning method. Subclasses are frozen dataclasses whose fields are the
    hyperparameters they take (see hyperparameters.py); they set the class traits below and
    implement `select`. Everything that differs by method is one of these traits: nothing outside
    engine/methods/ asks for a method by name.

    What the decoder computes in layers 0..L-1:
    - `sg_bimask`: replace the causal mask inside image spans by SG-BiMask (Eq. 4-5).
    - `score_queries`: which query rows rank the tokens at layer L-1 ("last", "text", "all",
      or "raters": the text rows after the span most relevant to its input embeddings, chosen
      once before layer 0; SparseVLM), or None when the method needs no attention scores.
    - `needs_mass`: record s and s_hat at layer L-1.
    - `score`: "attention" ranks by the attention probability received; "contribution" weights
      it by the norm of the token's value vector (CAPA).

    What a run of it is:
    - `prunes`: False only for the unpruned reference (vanilla): it takes no budget, reports
      none, and a comparison runs it once whatever the budgets.
    - `before_llm`: prune the projected visual features before decoder layer 0 instead of after
      layer L-1 (the plan's layer is 0 whatever L the user gave). Kept tokens keep their
      original positions unless `positions` says otherwise: generate() numbers the decoding
      steps from the full prompt.
    - `min_layer`: the smallest L it accepts; `reads_layer`: whether L is where it prunes, so
      that the model's layer count bounds it.
    - `roles`: the roles its selections give, in the legend's order, with their labels.
    - `reads_vision`: it ranks tokens by what the vision tower saw ([CLS] attention, patch
      features at the feature layer): the block taps the tower for it (engine/vision.py).
    - `vision_needs`: what else of the tower it reads (engine/vision.py's VISION_NEEDS: the
      layer's keys, the last layer's q and k, the projector), computed for it alone.
    - `stage_scores`: rank each stage's spans by the attention that the stage's own first layer
      would pay them from the last token, computed over the tokens entering it (its own norm,
      q/k projections and rotary; PyramidDrop), instead of recording layer L-1's attention.

    Where it prunes: `schedule` gives, for one span, the steps (layer, tokens left after it) of a
    prefill; one step for the single-layer methods (at `pruning_layer(L)`, `kept_count` tokens),
    several for the multi-stage ones. The engine prunes by it and Eq. 7 counts it, so the two
    never disagree.
    - `paired_with`: the method whose scores a figure contrasts with its own (the attention
      shift: the same scoring under the causal mask), or None.
    - `colour`: its line and points in every figure that compares methods (one per method,
      whichever others a figure shows).
    """

    name: ClassVar[str]
    prunes: ClassVar[bool] = True
    sg_bimask: ClassVar[bool] = False
    needs_mass: ClassVar[bool] = False
    before_llm: ClassVar[bool] = False
    min_layer: ClassVar[int] = 1  # layers 0..L-1 see every token
    reads_layer: ClassVar[bool] = True
    roles: ClassVar[tuple[Role, ...]] = (BY_SCORE,)
    paired_with: ClassVar[str | None] = None
    colour: ClassVar[str] = "#000000"
    reads_vision: ClassVar[bool] = False
    vision_needs: ClassVar[tuple[str, ...]] = ()
    stage_scores: ClassVar[bool] = False
    score_queries: str | None = None
    score: str = "attention"
    lambda_max: float = 1.0

    def __init_subclass__(cls, **kwargs):
        """A subclass that names itself registers, so that a method is its module alone."""
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in REGISTERED and REGISTERED[cls.name] is not cls:
                raise TypeError(f"two pruning methods are named {cls.name!r}: {REGISTERED[cls.name]} and {cls}")
            REGISTERED[cls.name] = cls

    def __str__(self) -> str:
        return self.name

    @classmethod
    def hyperparameters(cls) -> list[str]:
        """The hyperparameters this method takes: its fields that are declared ones, in the
        declarations' order."""
        from .hyperparameters import HYPERPARAMETERS

        own = {field.name for field in fields(cls)} if hasattr(cls, "__dataclass_fields__") else set()
        return [name for name in HYPERPARAMETERS if name in own]

    @classmethod
    def draws(cls) -> bool:
        """Whether it chooses tokens by chance: it then has a `seed` field, which PruneSettings fills."""
        return "seed" in getattr(cls, "__dataclass_fields__", {})

    @classmethod
    def role_label(cls, role: str) -> str | None:
        """What the legend calls `role` for this method; None when its selections never give it."""
        return next((own.label for own in cls.roles if own.name == role), None)

    def options(self) -> dict:
        """The hyperparameters as it runs (each given one, else its default), then the seed of a
        method that draws its tokens: what --json reports."""
        taken = self.hyperparameters() + (["seed"] if self.draws() else [])
        return {name: getattr(self, name) for name in taken}

    def pruning_layer(self, layer: int) -> int:
        """The layer its plan prunes at when the user asked for L = `layer`."""
        return 0 if self.before_llm else layer

    @property
    def renumbers(self) -> bool:
        """Kept tokens are numbered 0..M-1, as a shorter prompt (--positions renumber)."""
        return getattr(self, "positions", None) == "renumber"

    @property
    def compacts(self) -> bool:
        """The layers before its first step keep only what that step kept, once the prefill is
        done (--kv-cache compact)."""
        return getattr(self, "kv_cache", None) == "compact"

    @property
    def counts_per_image(self) -> bool:
        """Whether each image sets how many tokens it keeps (not k): no config can tell its cost."""
        return False

    def k_rule(self) -> str | None:
        """What k means for it where that is not "k tokens per image", said when a run keeps
        another count (None: k per image, tiles aside)."""
        return None

    def budget_problem(self, k: int) -> str | None:
        """Why it cannot run at budget k with its hyperparameters (VisionZip's split of k, SparseVLM's
        table of budgets); None: it can."""
        return None

    def kept_count(self, tokens: int, k: int) -> int:
        """How many of a span's `tokens` go on at budget k."""
        return min(tokens, k)

    def stage_layers(self, layer: int, num_layers: int | None) -> list[int]:
        """The layers its prefills prune before, for L = `layer` in a model of `num_layers` decoder
        layers (None: not known; single-layer methods never need it)."""
        return [self.pruning_layer(layer)]

    def schedule(self, tokens: int, k: int, layer: int, num_layers: int | None) -> list[tuple[int, int]]:
        """The steps that prune one span of `tokens` tokens at budget k: (layer, tokens of the span
        left from that layer on), layers ascending, counts falling; empty where it keeps the span
        whole. A step at layer 0 prunes before the first decoder layer."""
        kept = self.kept_count(tokens, k)
        return [(self.stage_layers(layer, num_layers)[0], kept)] if kept < tokens else []

    def select(self, span: SpanView, k: int) -> Selection:
        raise NotImplementedError


@dataclass(frozen=True)
class BeforeLLM(PruningMethod):
    """A method that prunes the projected visual features before decoder layer 0 (L = 0 whatever
    the user gave): its cache is shorter than the sequence from layer 0 on (a chat continues it
    on a SequenceCache). Its kept tokens keep their own positions, or are numbered 0..M-1 as a
    shorter prompt would be (--positions renumber: what the authors' pipelines that feed fewer
    embeddings do)."""

    before_llm = True
    min_layer = 0  # it never reads L: 0 says so
    reads_layer = False
    positions: str = "original"
