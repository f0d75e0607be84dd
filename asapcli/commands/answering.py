"""`asap run`'s core: the samples its arguments name, answered in one call (one sample alone,
its answer streamed; several as one left-padded batch), each with its --json record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..engine import METHODS, image_spans
from ..engine.settings import PruneSettings
from ..records import Answer
from ..report import figures
from ..runtime import patch_layout
from ..runtime.generation import GenerationResult, context_length, generate, generate_batch
from ..runtime.inputs import (
    Samples,
    build_batch_inputs,
    build_inputs,
    check_system,
    check_text,
    opening,
    user_message,
)
from ..runtime.loading import Loaded


@dataclass(frozen=True)
class Answered:
    image: Path
    prompt: str
    result: GenerationResult
    record: Answer
    span: tuple[int, int] | None = None  # the image's token span, for one sample alone


def answer(
    loaded: Loaded,
    settings: PruneSettings,
    samples: Samples,
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[], None] | None = None,
    draws_kept: bool = False,
) -> list[Answered]:
    """Every sample answered: one alone, its text streamed to `on_text`; several as one batch
    (each row its own plan, the same answers), `on_step` called after each decoding step.
    `draws_kept`: the caller will draw the kept patches, so a model whose image tokens cannot
    be placed on the image fails before generating."""
    for prompt in dict.fromkeys(prompt for _, prompt in samples.pairs):
        check_text(loaded.processor, prompt)
    check_system(loaded.processor, system, context_length(loaded))
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    if len(samples.pairs) > 1:
        inputs = build_batch_inputs(
            loaded.processor, [(prompt, samples.pictures[image]) for image, prompt in samples.pairs], system
        )
        results = generate_batch(loaded, inputs, settings, **sampling, on_step=on_step)
        pairs = zip(samples.pairs, results, strict=True)
        return [_answered(loaded, settings, *pair, result, system=system) for pair, result in pairs]
    ((image, prompt),) = samples.pairs
    inputs = build_inputs(loaded.processor, [*opening(system), user_message(prompt, 1)], [samples.pictures[image]])
    spans = image_spans(inputs["input_ids"][0], loaded.image_token_id)
    span = spans[0] if spans else None
    if draws_kept:
        patch_layout.span_layout(loaded.processor, samples.pictures[image].size, span[1] - span[0] if span else 0)
    result = generate(loaded, inputs, settings, on_text=on_text, **sampling)
    return [_answered(loaded, settings, image, prompt, result, span, system)]


def _answered(
    loaded, settings, image: Path, prompt: str, result: GenerationResult, span=None, system: str | None = None
) -> Answered:
    record = Answer(
        **result.figures(),
        image=str(image),
        prompt=prompt,
        system=system,
        model=loaded.name,
        method=settings.method.name,
        k=settings.budget,
        layer=result.layer if settings.method.prunes else None,  # no pruning layer to report
        options=settings.method.options(),
        prompt_tokens=result.prompt_tokens,
        device=str(loaded.device),
        environment=loaded.environment,
    )
    return Answered(image, prompt, result, record, span)


def kept_view(loaded: Loaded, picture: Image.Image, answered: Answered) -> figures.KeptView:
    """What the kept-tokens figure of one sample alone shows: each patch of the image in the role
    the engine gave its token (kept with its plan), laid out as the processor placed it."""
    start, end = answered.span
    layout = patch_layout.span_layout(loaded.processor, picture.size, end - start)
    result, record = answered.result, answered.record
    image = next((image for image in result.pruning.images if image.start == start), None)
    pruned = image is not None and image.kept is not None
    title = figures.kept_title(loaded.label, record.method, record.k, record.layer, result.kept_tokens, end - start)
    return figures.kept_view(
        layout,
        [position - start for position in image.kept] if pruned else None,
        image.roles if pruned else None,
        [[position - start for position in group] for group in image.absorbed] if pruned else None,
        title,
        record.method,
    )


def compare(
    loaded: Loaded,
    runs: list[PruneSettings],
    samples: Samples,
    max_tokens: int = 128,
    seed: int = 0,
    on_answer: Callable[[], None] | None = None,
) -> list[Answered]:
    """One image and prompt answered under each of `runs`, each alone, so that each keeps its
    plan for the figure; `on_answer` called after each."""
    answers = []
    for settings in runs:
        answers += answer(loaded, settings, samples, max_tokens=max_tokens, seed=seed, draws_kept=True)
        if on_answer is not None:
            on_answer()
    return answers


def comparison_line(answered: Answered) -> str:
    """`method k=N (kept K/V): answer`, as `asap compare` prints each (`, compact KV cache` after
    K/V for a run with one)."""
    record = answered.record
    budget = "" if record.k is None else f" k={record.k}"
    compact = ", compact KV cache" if record.options.get("kv_cache") == "compact" else ""
    return f"{record.method}{budget} (kept {record.kept_tokens}/{record.visual_tokens}{compact}): {record.answer}"


def comparison_figure(loaded: Loaded, samples: Samples, answers: list[Answered]):
    """The side-by-side figure of `compare`'s answers: the first (vanilla) as the original."""
    picture = samples.pictures[answers[0].image]
    columns = []
    for number, answered in enumerate(answers):
        record = answered.record
        if number == 0:
            heading = f"original ({record.method}, {record.visual_tokens} tokens)"
        else:
            budget = "" if record.k is None else f" k={record.k}"
            heading = f"{record.method}{budget}: kept {record.kept_tokens}/{record.visual_tokens}"
        columns.append(figures.ComparedPanel(heading, kept_view(loaded, picture, answered), record.answer))
    # L is said where a method prunes after layer L-1 (the multi-stage ones follow the model's depth)
    layer = next((a.record.layer for a in answers if a.record.layer and METHODS[a.record.method].reads_layer), None)
    before = list(dict.fromkeys(a.record.method for a in answers if a.record.layer == 0))
    title = f"{loaded.label}: “{answers[0].prompt}”" + (f", L={layer}" if layer else "")
    title += f" ({' and '.join(before)}: before the language model)" if before else ""
    return figures.draw_comparison(picture, columns, title)
