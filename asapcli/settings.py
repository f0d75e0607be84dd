"""What the user asked a pruning run for (PruneSettings) and the checks on it; no model needed."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .engine import METHODS, SCORE_QUERIES, SCORES
from .errors import UsageError

# Where kept tokens sit: at their own positions, or numbered afresh 0..M-1 (before-LLM methods).
POSITIONS = ("original", "renumber")


@dataclass(frozen=True)
class PruneSettings:
    """What the user asked for; `None` options take the method's own defaults."""

    method: str = "asap"
    k: int = 128
    layer: int = 2
    lambda_max: float | None = None
    merge_threshold: float | None = None
    score_queries: str | None = None
    score: str | None = None
    seed: int = 0
    positions: str = "original"

    def for_method(self, method: str, k: int | None = None) -> PruneSettings:
        """These settings for another method (and budget), as a comparison of several runs them:
        --positions renumber stays with the methods that prune before the language model only."""
        positions = self.positions if METHODS[method].before_llm else "original"
        return replace(self, method=method, k=self.k if k is None else k, positions=positions)

    def check(self, num_layers: int | None = None) -> None:
        """Raise UsageError for a value out of range; the layer's upper bound needs the model."""
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.k < 1:
            raise UsageError(f"k must be at least 1, got {self.k}")
        if self.layer < 1:
            raise UsageError(f"layer must be at least 1 (layers 0..L-1 see every token), got {self.layer}")
        if num_layers is not None and self.layer > num_layers - 1:
            raise UsageError(
                f"layer must be in 1..{num_layers - 1} for this model ({num_layers} layers), got {self.layer}"
            )
        if self.lambda_max is not None and not 0 < self.lambda_max <= 1:
            raise UsageError(f"lambda-max must be in (0, 1], got {self.lambda_max}")
        if self.merge_threshold is not None and not -1 <= self.merge_threshold <= 1:
            raise UsageError(f"merge-threshold is a cosine similarity in [-1, 1], got {self.merge_threshold}")
        if self.score_queries is not None and self.score_queries not in SCORE_QUERIES:
            raise UsageError(f"score-queries must be one of {', '.join(SCORE_QUERIES)}, got {self.score_queries!r}")
        if self.score is not None and self.score not in SCORES:
            raise UsageError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.positions not in POSITIONS:
            raise UsageError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.positions == "renumber" and not METHODS[self.method].before_llm:
            early = ", ".join(name for name, method in METHODS.items() if method.before_llm)
            raise UsageError(
                f"--positions renumber is for methods that prune before the language model ({early}); "
                f"{self.method} keeps original positions, as its reference code does"
            )
