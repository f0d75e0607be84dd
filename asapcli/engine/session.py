"""The pruning session: the one object the pruned decoder reads and writes while a model prunes.

It hands each forward call its plans (one per row) and keeps what each prefill did (a
`Prefill`: its plans, each row's padding, one SpanRecord per span pruned or scored), from which
every report is read: `PromptReport`, what one prompt's prefill pruned (the API's report, a
generation's result, chat, eval, profile and lmms-eval all read it), and `PruningReport`, the
block's sum. `pruned_as` is the block that answers through it (`asapcli.pruned`, asapcli/api.py,
is its public face): it plans each forward call of the model from the call's own input_ids,
before the model's forward runs. `attached` is the bare session, whose next call's plans are
given by hand (`plan_next`): the attention profile's score-only plans, fvcore's count of the
decoder alone, tests with plans of their own.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from transformers import PreTrainedModel

from ..errors import UnsupportedModel, UsageError
from . import cache_state, cost
from .decoder import PrunedDecoder
from .plans import PruningPlan, image_spans, make_plan
from .prune_pass import SpanRecord
from .settings import PruneSettings
from .vision import VisionTap
from .wiring import install, uninstall


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
class PromptReport:
    """What one prompt's prefill pruned: each image span (`spans`, its SpanRecords in the prompt's
    own tokens: kept positions, roles, absorbed, stages, the scores it was ranked by; `images`,
    the same as plain lists), the visual tokens it brought and kept, the schedule its visual
    tokens went through (`steps`: (layer, visual tokens left from it on), as Eq. 7 counts them)
    and the layer it first pruned at. `k_unmet` says why it kept another count than k asks
    (the method's rule of what k means), None where it kept what k asks."""

    row: int
    spans: tuple[SpanRecord, ...]
    images: tuple[ImageReport, ...]
    visual_tokens: int
    kept_tokens: int
    merged_tokens: int
    steps: tuple[tuple[int, int], ...]
    layer: int
    k_unmet: str | None

    def tflops(self, text_config) -> cost.VisualFlops:
        """Eq. 7 of the prompt's visual tokens, as pruned and with every one kept."""
        return cost.visual_flops(text_config, self.visual_tokens, list(self.steps))


@dataclass(frozen=True)
class Prefill:
    """One forward call that brought image spans: its plans (one per row), each row's batch
    padding, and per row the SpanRecords of the spans the decoder pruned or scored."""

    plans: tuple[PruningPlan, ...]
    padding: tuple[int, ...]
    records: tuple[tuple[SpanRecord, ...], ...]

    def pruned(self, row: int = 0) -> list[SpanRecord]:
        """The records of the spans of `row` that lost tokens (a score-only span lost none), in
        the batch's positions."""
        return [record for record in self.records[row] if record.kept is not None]

    def prompt(self, row: int = 0) -> PromptReport:
        """What the prefill pruned in `row`'s prompt, counted in its own tokens."""
        plan, padding = self.plans[row], self.padding[row]
        done = {record.start: record for record in self.pruned(row)}
        spans = [(start, end, _steps_taken(plan, start, end, done.get(start))) for start, end in plan.spans]
        visual = sum(end - start for start, end, _ in spans)
        kept = sum(steps[-1][1] if steps else end - start for start, end, steps in spans)
        layers = sorted({layer for _, _, steps in spans for layer, _ in steps})
        steps = tuple((layer, sum(_left(start, end, taken, layer) for start, end, taken in spans)) for layer in layers)
        records = tuple(record.shifted(padding) for record in self.pruned(row))
        images = tuple(_image_report(row, start - padding, end - padding, records) for start, end in plan.spans)
        return PromptReport(
            row=row,
            spans=records,
            images=images,
            visual_tokens=visual,
            kept_tokens=kept,
            merged_tokens=sum(record.merged for record in self.records[row]),
            steps=steps,
            layer=steps[0][0] if steps else plan.layer,
            k_unmet=_k_unmet(plan, kept),
        )


def _steps_taken(plan: PruningPlan, start: int, end: int, record: SpanRecord | None) -> list[tuple[int, int]]:
    """The steps the span [start, end) went through: (layer, tokens left from it on), less any
    step that kept all it was given (VisPruner's tiles and newlines can add up to the whole
    span); none for a span kept whole. A method whose count is the image's own (PruMerge+'s
    adaptive one) may keep another number than k."""
    if record is None or not plan.method.prunes:
        return []
    went, left = [], end - start
    for layer, positions in record.stages:
        if positions.numel() < left:
            went.append((layer, positions.numel()))
            left = positions.numel()
    return went


def _left(start: int, end: int, steps: list[tuple[int, int]], layer: int) -> int:
    """The tokens of the span [start, end) that `layer` holds under `steps`."""
    return min([end - start] + [count for at, count in steps if at <= layer])


def _k_unmet(plan: PruningPlan, kept: int) -> str | None:
    if not plan.method.prunes or not plan.spans:
        return None
    if kept == sum(min(plan.k, end - start) for start, end in plan.spans):
        return None
    return plan.method.k_rule() or "on a tiling model k is split among an image's tower items, in whole tokens"


def _image_report(row: int, start: int, end: int, records: tuple[SpanRecord, ...]) -> ImageReport:
    record = next((record for record in records if record.start == start), None)
    if record is None:  # a span the budget keeps whole, or a method that prunes nothing
        return ImageReport(row, start, end, None)
    stages = [(layer, positions.tolist()) for layer, positions in record.stages]
    return ImageReport(row, start, end, record.kept.tolist(), record.roles, record.absorbed_positions(), stages)


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


class PruningSession:
    """The pruned decoder's state while a model prunes: the plans of its next forward call
    (`plan_next`, used up by the call: `take_plans`), what each prefill did (`record`, kept in
    `prefills`) and the vision tower's cues for the methods that read them. A model's decoder
    reads and writes it and nothing else (the cache carries what later calls continue:
    engine/cache_state.py)."""

    def __init__(self, settings: PruneSettings | None, text_config, tap: VisionTap | None = None):
        self.settings = settings  # None for a session whose plans are all given by hand
        self.text_config = text_config  # the language model's, for Eq. 7
        self.tap = tap
        self.prefills: list[Prefill] = []
        self._next: tuple[list[PruningPlan], list[int]] | None = None  # plans and each row's padding
        self._taken: tuple[list[PruningPlan], list[int]] = ([], [])  # those of the call running now

    def plan_next(self, plans: PruningPlan | list[PruningPlan] | None, padding: list[int] | None = None) -> None:
        """The next forward call's plans, one per row of its batch (a single plan: a batch of one;
        None: it prunes nothing); `padding`: each row's batch padding (none if not given)."""
        plans = [plans] if isinstance(plans, PruningPlan) else plans
        if plans and any(not plan.agrees_with(plans[0]) for plan in plans):
            raise ValueError("the plans of one batch must share method, k and layer")
        self._next = None if plans is None else (list(plans), list(padding or [0] * len(plans)))

    def take_plans(self) -> list[PruningPlan] | None:
        """The decoder's: this call's plans, used up (a later call prunes nothing unless planned)."""
        if self._next is None:
            return None
        plans, padding = self._next
        self._next = None
        self._taken = (plans, padding)
        return plans

    def record(self, records: list[list[SpanRecord]]) -> None:
        """The decoder's: what the call it took plans for did to each row's spans."""
        plans, padding = self._taken
        if any(plan.spans for plan in plans):
            self.prefills.append(Prefill(tuple(plans), tuple(padding), tuple(tuple(row) for row in records)))

    def vision(self, ordinal: int, count: int):
        """What the vision tower gave for the image of the call's span number `ordinal` of `count`
        (row by row, left to right: the order the model places their features; generate()
        encodes a call's images before the call, a direct call inside it, so they are read when
        the decoder asks); None without a tap."""
        return self.tap.image(ordinal, count) if self.tap is not None else None

    def prompts(self) -> list[PromptReport]:
        """What each prompt prefilled so far pruned, call by call, row by row."""
        return [prefill.prompt(row) for prefill in self.prefills for row in range(len(prefill.plans))]

    def report(self) -> PruningReport:
        """What the session pruned: every image of every prompt prefilled so far, and Eq. 8 over them."""
        prompts = self.prompts()
        layer = prompts[0].layer if prompts else make_plan(self.settings, []).layer
        return PruningReport(
            self.settings.method.name,
            self.settings.k,
            layer,
            [image for prompt in prompts for image in prompt.images],
            sum(prompt.visual_tokens for prompt in prompts),
            sum(prompt.kept_tokens for prompt in prompts),
            sum(prompt.merged_tokens for prompt in prompts),
            cost.eq8(prompt.tflops(self.text_config) for prompt in prompts),
        )


# Models attached to a session now, and the thread that attached each: a second session around
# the same calls would prune them twice.
_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ANOTHER_THREAD = (
    "this model is inside an asapcli.pruned block in another thread: a model prunes for one thread at a time; "
    "give each thread a model of its own"
)


@contextmanager
def attached(model: PreTrainedModel, session: PruningSession) -> Iterator[PruningSession]:
    """The model's decoder reads and writes `session` inside the block (installed for it where
    it was not), and only from the thread that opened it."""
    if model in _OPEN:
        if _OPEN[model] != threading.get_ident():
            raise UsageError(ANOTHER_THREAD)
        raise UsageError("this model is inside an asapcli.pruned block already; blocks do not nest")
    was_installed = isinstance(model.get_decoder(), PrunedDecoder)
    decoder = install(model)
    _OPEN[model] = threading.get_ident()
    decoder.session = session
    try:
        yield session
    finally:
        decoder.session = None
        _OPEN.pop(model, None)
        if not was_installed:
            uninstall(model)


@contextmanager
def pruned_as(model: PreTrainedModel, settings: PruneSettings) -> Iterator[PruningSession]:
    """`pruned` with its arguments as one PruneSettings (what the CLI's options make): every
    forward call of the model inside the block is planned from its own input_ids."""
    if getattr(model.config, "image_token_id", None) is None:  # first: a text-only model has no layer to blame
        raise UnsupportedModel(f"{type(model).__name__} has no image_token_id in its config: asap prunes image tokens")
    settings = settings.for_model(model.config.get_text_config().num_hidden_layers)  # once: trusted after
    method = settings.method
    tap = VisionTap(model, method.name, method.vision_needs) if method.reads_vision else None
    session = PruningSession(settings, model.config.get_text_config(), tap)
    planner = _CallPlanner(model, session)
    with attached(model, session):
        if tap is not None:
            tap.install()
        hook = model.register_forward_pre_hook(planner, with_kwargs=True)
        try:
            yield session
        finally:
            hook.remove()
            if tap is not None:
                tap.remove()


class _CallPlanner:
    """The forward pre-hook of a `pruned_as` block: plans each forward call of the model from its
    own arguments (the image spans of each row, the tokens a cache holds already)."""

    def __init__(self, model: PreTrainedModel, session: PruningSession):
        self.model, self.session = model, session
        self.owner = threading.get_ident()

    def __call__(self, module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self.owner:  # the session is the block's thread's alone
            raise UsageError(ANOTHER_THREAD)
        plans, padding = self.plans_for_call(args, kwargs) or (None, None)
        self.session.plan_next(plans, padding)

    def plans_for_call(self, args: tuple, kwargs: dict) -> tuple[list[PruningPlan], list[int]] | None:
        """The plans of one forward call of the model and each row's padding; None for a call
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
        settings = self.session.settings
        if cache is not None:  # before the model's forward (its vision tower) runs
            cache_state.check_continuation(cache, input_ids.shape[1])
        mask = kwargs.get("attention_mask")
        padding = [0] * input_ids.shape[0] if mask is None else (mask[:, : cached + input_ids.shape[1]] == 0).sum(1)
        image_token = self.model.config.image_token_id
        spans = [[(start + cached, end + cached) for start, end in image_spans(row, image_token)] for row in input_ids]
        plans = [make_plan(settings, row_spans) for row_spans in spans]
        return plans, [int(p) for p in padding]

    def _refuse_outputs(self, kwargs: dict) -> None:
        for output in ("output_hidden_states", "output_attentions"):
            if kwargs.get(output) or getattr(self.model.config, output, False):
                raise UsageError(
                    f"{output} is not available inside an asapcli.pruned block (the pruned decoder runs its own layers)"
                )
