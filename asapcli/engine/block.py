"""The API's block as the engine runs it: every forward call of the model inside
`pruned_as(model, settings)` is planned from its own input_ids (the image spans of each row, the
tokens a cache holds already) and the plans are handed to the pruned decoder for that call.
`asapcli.pruned` (asapcli/api.py) is its public face; run, chat, eval and profile answer through it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..errors import UsageError
from . import PrunedDecoder, PruningPlan, UnsupportedModel, image_spans, install, uninstall
from .plans import first_layer, make_plan, token_counts, visual_steps
from .schedule import visual_flops
from .settings import PruneSettings
from .vision import VisionTap


@dataclass(frozen=True)
class ImageReport:
    """One image of one prompt: its tokens [start, end) and the positions kept, both counted in
    the prompt's own tokens (a batch's padding left out); `kept` is None where nothing was pruned.
    For each kept position, `roles` says why it was kept ("selected" by the method's criterion;
    ASAP's merge "anchor" and "refilled" slot; pool's "pooled" cell) and `absorbed` the positions
    whose states it took in (an anchor's merged tokens, a pooled cell's other patches). `stages`:
    for each pruning step, (its layer, the positions kept from it on): one for the single-layer
    methods, one per stage for multi-stage ones (PyramidDrop); the last is `kept`."""

    row: int
    start: int
    end: int
    kept: list[int] | None
    roles: list[str] | None = None
    absorbed: list[list[int]] | None = None
    stages: list[tuple[int, list[int]]] | None = None


@dataclass(frozen=True)
class PruningReport:
    method: str
    k: int
    layer: int  # L of the plans (their first pruning layer): 0 for methods that prune before the language model
    images: list[ImageReport]
    visual_tokens: int
    kept_tokens: int
    merged_tokens: int
    flops_ratio: float  # Eq. 8 over every prompt the block prefilled: their FLOPs over those of keeping every token


class Pruning:
    """What the block pruned: the plan of every prefill that brought images."""

    def __init__(self, model: PreTrainedModel, settings: PruneSettings, tap: VisionTap | None = None):
        self.model = model
        self.settings = settings
        self.tap = tap  # what the vision tower saw, for a method that reads it
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
        if self.tap is not None:
            self._attach_vision(plans)
        return plans

    def _attach_vision(self, plans: list[PruningPlan]) -> None:
        """Each plan's spans read the vision tower's cues of their own image: the call's images,
        in the order the model places their features (row by row, left to right), are the ones
        the model encoded last when the decoder runs (generate() encodes them before the call,
        a direct call inside it, after this), so they are looked up then."""
        count = sum(len(plan.spans) for plan in plans)
        first = 0
        for plan in plans:
            index = {start: first + n for n, (start, _) in enumerate(plan.spans)}
            plan.vision = lambda start, index=index: self.tap.image(index[start], count)
            first += len(plan.spans)

    def plans_for_call(self, args: tuple, kwargs: dict) -> list[PruningPlan] | None:
        """The plans of one forward call of the model, from its own arguments; None for a call
        with no image to find: embeddings given directly, or a decoding step (one token the model
        made after a cache; finding spans there would cost a device sync per token)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None
        self._refuse_outputs(kwargs)
        cache = kwargs.get("past_key_values")
        cached = cache.get_seq_length() if cache is not None else 0
        if cached and input_ids.shape[1] == 1:
            return None
        if cached and input_ids.shape[1] > 1 and self.prefills and not self.settings.method.continues_cache:
            # Their cache is shorter than the sequence it holds: generate() would feed its image again.
            raise UsageError(
                f"{self.settings.method} prunes before the first layer, so a cache it pruned cannot be continued by a "
                "later call; answer each prompt from the start (asap chat refuses these methods for the same reason)"
            )
        mask = kwargs.get("attention_mask")
        padding = [0] * input_ids.shape[0] if mask is None else (mask[:, : cached + input_ids.shape[1]] == 0).sum(1)
        return self.plans_for(input_ids, cached, [int(p) for p in padding])

    def _refuse_outputs(self, kwargs: dict) -> None:
        for output in ("output_hidden_states", "output_attentions"):
            if kwargs.get(output) or getattr(self.model.config, output, False):
                raise UsageError(
                    f"{output} is not available inside an asapcli.pruned block (the pruned decoder runs its own layers)"
                )

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
                images += _image_reports(row, plan, padding[row])
                tokens, kept_tokens = token_counts(plan)
                visual, kept, merged = visual + tokens, kept + kept_tokens, merged + plan.merged
                if tokens:
                    pruned_tflops += visual_flops(text_config, tokens, visual_steps(plan))[0]
                    full_tflops += visual_flops(text_config, tokens, [])[0]
        layer = first_layer(self.plans[0]) if self.plans else make_plan(self.settings, []).layer
        ratio = pruned_tflops / full_tflops if full_tflops else 1.0
        return PruningReport(self.settings.method.name, self.settings.k, layer, images, visual, kept, merged, ratio)


def _image_reports(row: int, plan: PruningPlan, padding: int) -> list[ImageReport]:
    """One report per image span of a row's plan, in the row's own tokens (`padding` left out)."""
    pruned = {record.start: record.shifted(padding) for record in plan.pruned}
    reports = []
    for start, end in plan.spans:
        record = pruned.get(start)
        if record is None:  # a span the budget keeps whole, or a method that prunes nothing
            reports.append(ImageReport(row, start - padding, end - padding, None))
        else:
            kept, absorbed = record.kept.tolist(), record.absorbed_positions()
            stages = [(layer, positions.tolist()) for layer, positions in record.stages]
            reports.append(ImageReport(row, record.start, record.end, kept, record.roles, absorbed, stages))
    return reports


# Models inside a block now: a second block around the same calls would prune them twice.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@contextmanager
def pruned_as(model: PreTrainedModel, settings: PruneSettings) -> Iterator[Pruning]:
    """`pruned` with its arguments as one PruneSettings (what the CLI's options make)."""
    if getattr(model.config, "image_token_id", None) is None:  # first: a text-only model has no layer to blame
        raise UnsupportedModel(f"{type(model).__name__} has no image_token_id in its config: asap prunes image tokens")
    settings = settings.for_model(model.config.get_text_config().num_hidden_layers)  # once: trusted after
    if model in _OPEN:
        raise UsageError("this model is inside an asapcli.pruned block already; blocks do not nest")
    was_installed = isinstance(model.get_decoder(), PrunedDecoder)
    method = settings.method
    tap = VisionTap(model, method.name, method.vision_needs) if method.reads_vision else None
    decoder = install(model)
    pruning = Pruning(model, settings, tap)

    owner = threading.get_ident()

    def before_forward(module, args, kwargs):
        if threading.get_ident() != owner:  # the decoder's state is the block's thread's alone
            raise UsageError(
                "this model is inside an asapcli.pruned block in another thread: a model prunes for one thread "
                "at a time; give each thread a model of its own"
            )
        decoder.prune_next(pruning.plans_for_call(args, kwargs))

    _OPEN.add(model)
    try:
        if tap is not None:
            tap.install()
        with decoder.pruning(None):
            hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)
            try:
                yield pruning
            finally:
                hook.remove()
    finally:
        _OPEN.discard(model)
        if tap is not None:
            tap.remove()
        if not was_installed:
            uninstall(model)
