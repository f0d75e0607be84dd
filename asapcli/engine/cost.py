"""Theoretical FLOPs of the visual tokens in the language model (paper Appendix B, Eq. 7-8).

Convention (the paper's): multiply-accumulates, visual tokens only, attention and FFN only;
per layer with v visual tokens 4 v d^2 + 2 v^2 d + 3 v d m (d hidden, m FFN intermediate size).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UsageError, ascii_digits

CONVENTION = "multiply-accumulates of the visual tokens only, per layer 4vd^2 + 2v^2d + 3vdm (paper Eq. 7)"
GQA_CONVENTION = (
    "multiply-accumulates of the visual tokens only, per layer 2vd^2 (1 + kv_heads/heads) + 2v^2d + 3vdm "
    "(Eq. 7 with grouped-query k/v projections)"
)


@dataclass(frozen=True)
class Architecture:
    """The numbers Eq. 7 reads from a model: decoder layers, hidden size d, FFN size m, attention
    and k/v heads, and the visual tokens of one image."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    visual_tokens: int


@dataclass(frozen=True)
class Stage:
    """`layers` consecutive decoder layers that each see `tokens` visual tokens."""

    layers: int
    tokens: int


def layer_flops(v: int, hidden: int, intermediate: int, kv_fraction: float = 1.0) -> float:
    """One layer with v visual tokens. `kv_fraction` = kv_heads / heads shrinks the k and v
    projections for grouped-query attention; 1 is the paper's multi-head count."""
    projections = 2 * v * hidden**2 * (1 + kv_fraction)
    return projections + 2 * v**2 * hidden + 3 * v * hidden * intermediate


def schedule_flops(stages: list[Stage], hidden: int, intermediate: int, kv_fraction: float = 1.0) -> float:
    """Eq. 7: the sum over stages of L_n x per-layer FLOPs with v_n tokens."""
    return sum(stage.layers * layer_flops(stage.tokens, hidden, intermediate, kv_fraction) for stage in stages)


def single_prune(num_layers: int, visual_tokens: int, kept: int, layer: int) -> list[Stage]:
    """All tokens in layers 0..L-1, `kept` tokens in layers L..end (one pruning step)."""
    if kept >= visual_tokens:
        return [Stage(num_layers, visual_tokens)]
    return pruning_schedule(num_layers, visual_tokens, [(layer, kept)])


def pruning_schedule(num_layers: int, visual_tokens: int, steps: list[tuple[int, int]]) -> list[Stage]:
    """Stages from pruning steps (layer, tokens): from `layer` on, `tokens` visual tokens remain.
    Layer 0 means pruned before the first decoder layer. Empty stages are dropped."""
    if not steps:
        raise UsageError("the schedule is empty: give LAYER:TOKENS steps, e.g. 2:960,16:480")
    stages, start, tokens = [], 0, visual_tokens
    for layer, kept in sorted(steps):
        # A step that prunes nothing would show as a stage of its own, as if it had.
        if not 0 <= layer < num_layers:
            raise UsageError(
                f"pruning layer {layer} is outside this model's layers 0..{num_layers - 1} "
                f"(a step at layer {num_layers} or later, after the last layer, prunes nothing)"
            )
        if kept < 1:
            raise UsageError(f"a stage must keep at least 1 token, got {kept}")
        if kept >= tokens == visual_tokens:
            raise UsageError(
                f"step {layer}:{kept} keeps every visual token (the image has {visual_tokens}): it prunes nothing"
            )
        if kept > tokens:
            raise UsageError(f"tokens must not grow along the schedule: {kept} after {tokens} at layer {layer}")
        if kept == tokens:
            raise UsageError(f"step {layer}:{kept} keeps the {tokens} tokens the step before left: it prunes nothing")
        stages.append(Stage(layer - start, tokens))
        start, tokens = layer, kept
    stages.append(Stage(num_layers - start, tokens))
    return [stage for stage in stages if stage.layers > 0]


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """'2:960,16:480' -> [(2, 960), (16, 480)]."""
    if not text.strip():
        raise UsageError("--schedule is empty: write LAYER:TOKENS steps, e.g. 2:960,16:480")
    steps = []
    for item in text.split(","):
        layer, sep, tokens = item.strip().partition(":")
        if not sep or not ascii_digits(layer) or not ascii_digits(tokens):
            raise UsageError(f"bad schedule item {item.strip()!r}: write LAYER:TOKENS, e.g. 2:960,16:480")
        steps.append((int(layer), int(tokens)))
    layers = [layer for layer, _ in steps]
    if len(set(layers)) != len(layers):
        raise UsageError(f"schedule names a layer twice: {text}")
    return steps


def budget_for(arch: Architecture, method, layer: int, target: float) -> int:
    """The largest k whose visual FLOPs (Eq. 7-8), as the method's schedule prunes an image of
    `arch.visual_tokens` tokens with L = `layer`, stay within `target` of vanilla's: what --flops
    gives each method, so that methods compare at equal cost. Only budgets the method can run at
    count (SparseVLM's table). A UsageError says why there is none: the target is under the least
    the method does, or k does not set its counts (an adaptive count, a fixed stage ratio)."""
    tokens = arch.visual_tokens
    if tokens < 2:
        raise UsageError(f"an image of {tokens} visual token leaves nothing to prune: --flops has no k to choose")
    if method.counts_per_image:
        raise UsageError(f"--flops chooses k, but {method.k_rule()}: give -k, or leave the option out")
    full = schedule_flops([Stage(arch.layers, tokens)], arch.hidden, arch.intermediate)

    def ratio(k: int) -> float:
        steps = method.schedule(tokens, k, layer, arch.layers)
        stages = pruning_schedule(arch.layers, tokens, steps) if steps else [Stage(arch.layers, tokens)]
        return schedule_flops(stages, arch.hidden, arch.intermediate) / full

    ratios = {k: ratio(k) for k in range(1, tokens + 1) if method.budget_problem(k) is None}
    if len(ratios) > 1 and len(set(ratios.values())) == 1:
        raise UsageError(f"--flops chooses k, but {method}'s counts do not depend on k with these options: give -k")
    fitting = [k for k, share in ratios.items() if share <= target * (1 + 1e-12)]
    if not fitting:
        least = min(ratios.values())
        raise UsageError(
            f"{method} cannot prune to {target:.2%} of vanilla's visual FLOPs on this model: the least it runs at "
            f"is {least:.2%}; give --flops {math.ceil(least * 10000) / 100:g}% or more"
        )
    return max(fitting)


def parse_targets(text: str) -> list[float]:
    """--flops: comma-separated shares of vanilla's visual FLOPs, each a percentage (25%) or a
    fraction (0.25), above 0 and at most 100%; one given twice counted once."""
    targets = []
    for item in (item.strip() for item in text.split(",") if item.strip()):
        number = item.removesuffix("%")
        try:
            value = float(number) / (100 if item.endswith("%") else 1)
        except ValueError:
            raise UsageError(f"--flops takes percentages (25%) or fractions (0.25), got {item!r}") from None
        if not 0 < value <= 1 or not math.isfinite(value):
            raise UsageError(f"--flops must be above 0 and at most 100% of vanilla's visual FLOPs, got {item!r}")
        targets.append(value)
    if not targets:
        raise UsageError("--flops is empty")
    return list(dict.fromkeys(targets))


VALUE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def kv_storage(
    arch: Architecture, stages: list[Stage], text_tokens: int, value_bytes: int, cache: str = "exact"
) -> int:
    """Bytes of the KV cache after one prefill (the paper's Table 4): every layer holds K and V
    (kv_heads x head_dim values each) of the text and of the visual tokens it keeps. An "exact"
    cache keeps in the layers before the first pruning step every token they saw, as exact
    decoding needs; a "compact" one holds there only what that step kept, as Table 4 counts."""
    width = 2 * arch.hidden * arch.kv_heads // arch.heads
    held = [stage.tokens for stage in stages for _ in range(stage.layers)]
    if cache == "compact" and len(stages) > 1 and stages[0].tokens == arch.visual_tokens:
        held[: stages[0].layers] = [stages[1].tokens] * stages[0].layers
    return sum((text_tokens + tokens) * width * value_bytes for tokens in held)


@dataclass(frozen=True)
class VisualFlops:
    """Eq. 7 of one prompt's visual tokens in TFLOPs: as pruned, and with every one kept."""

    pruned: float
    full: float

    @property
    def ratio(self) -> float:
        """Eq. 8: the pruned FLOPs over those of keeping every token."""
        return self.pruned / self.full if self.full else 1.0


def token_flops(text_config, tokens: int, kept: int, layer: int) -> VisualFlops:
    """Eq. 7-8 of `tokens` tokens of which `kept` go past layer L-1 in the language model that
    `text_config` describes. The paper counts the visual tokens; given the whole prompt, the same
    formula tells what the prefill as a whole should save."""
    return visual_flops(text_config, tokens, [(layer, kept)] if kept < tokens else [])


def visual_flops(text_config, tokens: int, steps: list[tuple[int, int]]) -> VisualFlops:
    """Eq. 7-8 of `tokens` tokens pruned by `steps` (layer, tokens left from it on; empty: none
    pruned) in the language model that `text_config` describes: a prompt's schedule as the engine
    ran it (session.PromptReport.steps)."""
    hidden, intermediate = text_config.hidden_size, text_config.intermediate_size
    num_layers = text_config.num_hidden_layers
    stages = pruning_schedule(num_layers, tokens, steps) if steps else [Stage(num_layers, tokens)]
    full = [Stage(num_layers, tokens)]
    return VisualFlops(
        schedule_flops(stages, hidden, intermediate) / 1e12, schedule_flops(full, hidden, intermediate) / 1e12
    )


def eq8(counts: Iterable[VisualFlops]) -> float:
    """Eq. 8 over several prompts: their visual tokens' FLOPs over those of keeping every one. The
    v^2 term of Eq. 7 is per sequence, so it is the ratio of the sums, not the mean of the ratios;
    1 where no prompt brought a visual token."""
    counts = list(counts)
    full = sum(count.full for count in counts)
    return sum(count.pruned for count in counts) / full if full else 1.0
