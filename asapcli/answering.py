"""`asap run`'s core: the samples its arguments name, answered in one call (one sample alone,
its answer streamed; several as one left-padded batch), each with its --json record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import figures
from .engine import image_spans
from .errors import UsageError
from .generation import GenerationResult, generate, generate_batch
from .inputs import (
    build_batch_inputs,
    build_inputs,
    check_prompt,
    check_text,
    expand_images,
    load_image,
    pair_samples,
    user_message,
)
from .loading import Loaded
from .records import Answer
from .settings import PruneSettings


@dataclass(frozen=True)
class Samples:
    """(image, prompt) pairs in the order given, and each image read once."""

    pairs: list[tuple[Path, str]]
    pictures: dict[Path, Image.Image]


def read_samples(
    arguments: list[str], images: list[str], prompts: list[str], read_prompt: Callable[[], str]
) -> Samples:
    """IMAGE... PROMPT (or, with `prompts`, all images), more `images`; a prompt '-' is
    `read_prompt()` (stdin). Every prompt is checked and every image read before the model loads."""
    if not prompts:
        if len(arguments) < 2 and not images:
            raise UsageError("give an image and a prompt: asap run IMAGE PROMPT")
        *arguments, prompt = arguments
        prompts = [prompt]
    prompts = [read_prompt() if prompt == "-" else prompt for prompt in prompts]
    for prompt in prompts:
        check_prompt(prompt)
        if _names_a_file(prompt):
            raise UsageError(
                f"the prompt {prompt!r} is a file: give the question after the images (asap run IMAGE PROMPT)"
            )
    pairs = pair_samples(expand_images([*arguments, *images]), prompts)
    return Samples(pairs, {path: load_image(path) for path, _ in pairs})


def _names_a_file(text: str) -> bool:
    try:
        return bool(text.strip()) and Path(text).expanduser().is_file()
    except (OSError, ValueError):  # too long, or a character no path holds: a question
        return False


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
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    draws_kept: bool = False,
) -> list[Answered]:
    """Every sample answered: one alone, its text streamed to `on_text`; several as one batch
    (each row its own plan, the same answers). `draws_kept`: the caller will draw the kept
    patches, so a model without one square grid of tokens fails before generating."""
    for prompt in dict.fromkeys(prompt for _, prompt in samples.pairs):
        check_text(loaded.processor, prompt)
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    if len(samples.pairs) > 1:
        inputs = build_batch_inputs(
            loaded.processor, [(prompt, samples.pictures[image]) for image, prompt in samples.pairs]
        )
        results = generate_batch(loaded, inputs, settings, **sampling)
        return [_answered(loaded, settings, *pair, result) for pair, result in zip(samples.pairs, results, strict=True)]
    ((image, prompt),) = samples.pairs
    inputs = build_inputs(loaded.processor, [user_message(prompt, 1)], [samples.pictures[image]])
    spans = image_spans(inputs["input_ids"][0], loaded.image_token_id)
    span = spans[0] if spans else None
    if draws_kept:
        figures.token_grid(span[1] - span[0] if span else 0)
    result = generate(loaded, inputs, settings, on_text=on_text, **sampling)
    return [_answered(loaded, settings, image, prompt, result, span)]


def _answered(loaded, settings, image: Path, prompt: str, result: GenerationResult, span=None) -> Answered:
    vanilla = settings.method == "vanilla"  # no budget, no pruning layer: none to report
    record = Answer(
        **Answer.figures(result),
        image=str(image),
        prompt=prompt,
        model=loaded.name,
        method=settings.method,
        k=None if vanilla else settings.k,
        layer=None if vanilla else result.layer,
        options=settings.method_options(),
        prompt_tokens=result.prompt_tokens,
        device=str(loaded.device),
    )
    return Answered(image, prompt, result, record, span)


def kept_picture(loaded: Loaded, samples: Samples, answered: Answered) -> Image.Image:
    """The image as the language model kept it (one sample alone): dropped patches darkened."""
    picture = samples.pictures[answered.image]
    return figures.kept_in_span(picture, loaded.processor.image_processor, answered.span, answered.result)
