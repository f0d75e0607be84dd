"""PyramidDrop (Xing et al., CVPR 2025): the image tokens are dropped in stages, before layers
D/4, D/2 and 3D/4 of a D-layer language model (8, 16, 24 of 32), each stage keeping a fraction
lambda of what the previous one left. A stage ranks the tokens left by the attention that its own
first layer pays them from the last prompt token, over the tokens entering it. docs/method.md
says how -k maps to lambda and what was read where the authors' code is ambiguous."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import BY_SCORE, PruningMethod, Selection, SpanView

STAGES = 4  # the schedule's layers split the model in 4: stages before layers D/4, 2D/4, 3D/4
BUDGET = "budget"  # lambda matched to k (the default), else a number: the fixed ratio


@dataclass(frozen=True)
class PyramidDrop(PruningMethod):
    name = "pdrop"
    colour = "#E69F00"
    stage_scores = True
    min_layer = 0  # it never reads L: its stages follow the model's depth
    reads_layer = False
    roles = (replace(BY_SCORE, label="kept by each stage's attention"),)
    positions: str = "original"  # or "renumber": numbered afresh after each stage (the authors' code)
    stage_ratio: str = BUDGET  # or lambda itself, e.g. "0.5" (the authors' scripts)
    kv_cache: str = "exact"  # or "compact": layers before the first stage keep only what it kept, once prefilled

    def k_rule(self) -> str | None:
        return (
            "pdrop's k is the mean its stages keep over the layers (or --stage-ratio's); its last stage keeps "
            "fewer, far fewer on a shallow model"
        )

    def stage_layers(self, layer: int, num_layers: int | None) -> list[int]:
        """D/4, D/2, 3D/4 rounded down (at least layer 1), for a model of `num_layers` = D."""
        return self._layers(num_layers, max(1, (num_layers or STAGES) // STAGES))

    @staticmethod
    def _layers(num_layers: int | None, spacing: int | None = None) -> list[int]:
        depth = num_layers or STAGES
        if spacing is None:
            layers = [max(1, stage * depth // STAGES) for stage in range(1, STAGES)]
        else:
            layers = [stage * spacing for stage in range(1, STAGES)]
        return sorted({layer for layer in layers if layer < depth})

    def schedule(self, tokens: int, k: int, layer: int, num_layers: int | None) -> list[tuple[int, int]]:
        """Stage s keeps int(tokens * lambda^s) tokens (at least 1), as the authors' int(n * ratio);
        a stage that would keep as many as the one before is left out."""
        depth = num_layers or STAGES
        if self.stage_ratio != BUDGET:
            ratio, layers = float(self.stage_ratio), self._layers(depth)
        elif k >= tokens:
            return []
        else:
            ratio, layers = matched_ratio(tokens, k, depth)
        steps, left = [], tokens
        for stage, at in enumerate(layers, start=1):
            count = max(1, int(tokens * ratio**stage))
            if count < left:
                steps.append((at, count))
                left = count
        return steps

    def select(self, span: SpanView, k: int) -> Selection:
        from .. import ops  # at call time: the registry imports without torch (methods/__init__.py)

        kept = ops.top_k(span.importance, k)
        return Selection(kept=kept, hidden=span.hidden[kept])


def mean_tokens(tokens: int, ratio: float, layers: list[int], depth: int) -> float:
    """The image tokens a layer holds, averaged over the `depth` layers, when stage s (from
    layers[s-1] on) holds tokens * ratio^s (before rounding)."""
    bounds = [0, *layers, depth]
    return sum((bounds[s + 1] - bounds[s]) * tokens * ratio**s for s in range(len(bounds) - 1)) / depth


def matched_ratio(tokens: int, k: int, depth: int) -> tuple[float, list[int]]:
    """lambda in [0, 1) whose stages average k image tokens per layer, and the stage layers: D/4,
    D/2, 3D/4 where they can reach k (their first stage alone averages tokens / 4); else m, 2m,
    3m for the spacing m < D/4 that can whose lambda is nearest the authors' 0.5 (the deeper on
    a tie); spacing 1 where none can (lambda 0: one token left)."""
    layers = PyramidDrop._layers(depth)
    if tokens * layers[0] / depth < k:
        return _bisect(tokens, k, layers, depth), layers
    options = [PyramidDrop._layers(depth, m) for m in range(1, layers[0]) if tokens * m / depth < k]
    if not options:
        return 0.0, PyramidDrop._layers(depth, 1)
    ratios = [(_bisect(tokens, k, option, depth), option) for option in options]
    return min(reversed(ratios), key=lambda pair: abs(pair[0] - 0.5))


def _bisect(tokens: int, k: int, layers: list[int], depth: int) -> float:
    """The ratio whose mean_tokens is k (mean_tokens grows with it), by 60 halvings of [0, 1]."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_tokens(tokens, middle, layers, depth) < k else (low, middle)
    return low
