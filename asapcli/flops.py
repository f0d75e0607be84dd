"""Theoretical FLOPs of the visual tokens in the language model (paper Appendix B, Eq. 7-8).

Convention (the paper's): multiply-accumulates, visual tokens only, attention and FFN only;
per layer with v visual tokens 4 v d^2 + 2 v^2 d + 3 v d m (d hidden, m FFN intermediate size).
"""

from __future__ import annotations

from dataclasses import dataclass

CONVENTION = "multiply-accumulates of the visual tokens only, per layer 4vd^2 + 2v^2d + 3vdm (paper Eq. 7)"


@dataclass(frozen=True)
class Stage:
    """`layers` consecutive decoder layers that each see `tokens` visual tokens."""

    layers: int
    tokens: int


def layer_flops(v: int, hidden: int, intermediate: int) -> int:
    return 4 * v * hidden**2 + 2 * v**2 * hidden + 3 * v * hidden * intermediate


def schedule_flops(stages: list[Stage], hidden: int, intermediate: int) -> int:
    """Eq. 7: the sum over stages of L_n x per-layer FLOPs with v_n tokens."""
    return sum(stage.layers * layer_flops(stage.tokens, hidden, intermediate) for stage in stages)


def single_prune(num_layers: int, visual_tokens: int, kept: int, layer: int) -> list[Stage]:
    """All tokens in layers 0..L-1, `kept` tokens in layers L..end (one pruning step)."""
    return [Stage(layer, visual_tokens), Stage(num_layers - layer, min(kept, visual_tokens))]


def flops_ratio(stages: list[Stage], visual_tokens: int, hidden: int, intermediate: int) -> float:
    """Eq. 8: pruned FLOPs over L x full-layer FLOPs."""
    num_layers = sum(stage.layers for stage in stages)
    vanilla = num_layers * layer_flops(visual_tokens, hidden, intermediate)
    return schedule_flops(stages, hidden, intermediate) / vanilla if vanilla else 1.0
