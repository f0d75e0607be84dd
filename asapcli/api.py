"""Prune inside your own code: a context manager around any supported transformers LVLM.

    import asapcli
    with asapcli.pruned(model, method="asap", k=128, layer=2) as pruning:
        out = model.generate(**inputs, max_new_tokens=32)
    print(pruning.report())

Inside the block every forward call of `model` that brings image tokens prunes them: the image
spans are read from that call's `input_ids` (each row of a left-padded batch its own), so
`generate()`, a plain forward and a chat that continues a KV cache all work as they are.
Outside the block the model is what it was: the pruned decoder is installed on entry and taken
out on exit (unless it was there already, as on a model from `asapcli.loading.load`).

The CLI answers through the same block (`pruned_as(model, settings)`, with the settings its
options made): a question asked with `asap run` and with this API is pruned the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .engine import PrunedDecoder, PruningPlan, image_spans, install, uninstall
from .flops import token_flops
from .plans import make_plan, token_counts
from .settings import PruneSettings


@dataclass(frozen=True)
class ImageReport:
    """One image of one prompt: its tokens [start, end) and the positions kept, both counted in
    the prompt's own tokens (a batch's padding left out); `kept` is None where nothing was pruned.
    For each kept position, `roles` says why it was kept ("selected" by the method's criterion;
    ASAP's merge "anchor" and "refilled" slot; pool's "pooled" cell) and `absorbed` the positions
    whose states it took in (an anchor's merged tokens, a pooled cell's other patches)."""

    row: int
    start: int
    end: int
    kept: list[int] | None
    roles: list[str] | None = None
    absorbed: list[list[int]] | None = None


@dataclass(frozen=True)
class PruningReport:
    method: str
    k: int
    layer: int  # L of the plans: 0 for methods that prune before the language model
    images: list[ImageReport]
    visual_tokens: int
    kept_tokens: int
    merged_tokens: int
    flops_ratio: float  # Eq. 8 over every prompt the block prefilled: their FLOPs over those of keeping every token


class Pruning:
    """What the block pruned: the plan of every prefill that brought images."""

    def __init__(self, model: PreTrainedModel, settings: PruneSettings):
        self.model = model
        self.settings = settings
        self.prefills: list[tuple[list[PruningPlan], list[int]]] = []  # plans and each row's padding

    def plans_for(self, input_ids: torch.Tensor, cached: int, padding: list[int]) -> list[PruningPlan]:
        """One plan per row for a forward call over `input_ids` (B, n) after `cached` tokens."""
        image_token = self.model.config.image_token_id
        plans = [
            make_plan(self.settings, [(start + cached, end + cached) for start, end in image_spans(row, image_token)])
            for row in input_ids
        ]
        if any(plan.spans for plan in plans):
            self.prefills.append((plans, padding))
        return plans

    @property
    def plans(self) -> list[PruningPlan] | None:
        """The plans (one per row) of the block's first forward call that brought images: the
        prefill of a generate() call; None when no call did."""
        return self.prefills[0][0] if self.prefills else None

    def report(self) -> PruningReport:
        text_config = self.model.config.get_text_config()
        images, visual, kept, merged = [], 0, 0, 0
        pruned_tflops = full_tflops = 0.0  # Eq. 7 of each prompt, summed (its v^2 term is per sequence)
        for plans, padding in self.prefills:
            for row, plan in enumerate(plans):
                pruned = iter(zip(plan.kept, plan.roles, plan.absorbed))
                for start, end in plan.spans:
                    first = start - padding[row]
                    if not plan.shrinks(start, end):
                        images.append(ImageReport(row, first, end - padding[row], None))
                        continue
                    positions, roles, absorbed = next(pruned)
                    sources = [[first + index for index in indices] for indices in absorbed]
                    kept_positions = (positions - padding[row]).tolist()
                    images.append(ImageReport(row, first, end - padding[row], kept_positions, roles, sources))
                tokens, kept_tokens = token_counts(plan)
                visual, kept, merged = visual + tokens, kept + kept_tokens, merged + plan.merged
                if tokens:
                    pruned_tflops += token_flops(text_config, tokens, kept_tokens, plan.layer)[0]
                    full_tflops += token_flops(text_config, tokens, tokens, plan.layer)[0]
        layer = self.prefills[0][0][0].layer if self.prefills else self.settings.layer
        ratio = pruned_tflops / full_tflops if full_tflops else 1.0
        return PruningReport(self.settings.method, self.settings.k, layer, images, visual, kept, merged, ratio)


@contextmanager
def pruned(
    model: PreTrainedModel, method: str = "asap", k: int = 128, layer: int = 2, seed: int = 0, **options
) -> Iterator[Pruning]:
    """Prune the visual tokens of `model` (a transformers LVLM) in every forward call inside the
    block. `options` are the method's own, as the CLI spells them with underscores
    (`lambda_max`, `merge_threshold`, `score_queries`, `score`, `positions`); an option the
    method does not take, or a value out of range, raises asapcli.errors.UsageError."""
    with pruned_as(model, PruneSettings(method, k, layer, seed, **options)) as block:
        yield block


@contextmanager
def pruned_as(model: PreTrainedModel, settings: PruneSettings) -> Iterator[Pruning]:
    """`pruned` with its arguments as one PruneSettings (what the CLI's options make)."""
    settings.check(model.config.get_text_config().num_hidden_layers)
    was_installed = isinstance(model.get_decoder(), PrunedDecoder)
    decoder = install(model)
    pruning = Pruning(model, settings)

    def before_forward(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:  # embeddings given directly: no image tokens to find
            decoder.plans = None
            return
        cache = kwargs.get("past_key_values")
        cached = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        padding = [0] * input_ids.shape[0] if mask is None else (mask[:, : cached + input_ids.shape[1]] == 0).sum(1)
        decoder.plans = pruning.plans_for(input_ids, cached, [int(p) for p in padding])

    try:
        with decoder.pruning(None):
            hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)
            try:
                yield pruning
            finally:
                hook.remove()
    finally:
        if not was_installed:
            uninstall(model)
