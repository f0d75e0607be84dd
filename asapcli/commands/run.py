"""asap run IMAGE PROMPT: answer a question about an image, with pruning; several images or
prompts run as one padded batch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import display, figures
from ..errors import UsageError
from ..generation import GenerationResult, generate, generate_batch
from ..inputs import (
    build_batch_inputs,
    build_inputs,
    check_prompt,
    check_text,
    expand_images,
    load_image,
    pair_samples,
    user_message,
)
from ..plans import plan_for, plans_for_batch
from ..settings import PruneSettings
from . import options


@options.command
def run(
    arguments: Annotated[
        list[str],
        typer.Argument(
            metavar="IMAGE... PROMPT",
            help="Image files (or a quoted glob), then the question ('-' reads it from stdin). With --prompt, "
            "all are images.",
        ),
    ],
    more_images: Annotated[
        list[str] | None, typer.Option("--image", "-i", help="Another image (repeatable; a quoted glob works).")
    ] = None,
    prompts: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="A question (repeatable): one per image, or each for the one image."),
    ] = None,
    *,
    where: options.Where,
    pruning: options.OneMethod,
    sampling: options.Sampling,
    save_kept: Annotated[
        Path | None,
        typer.Option(
            "--save-kept",
            help="Write a PNG of the image with the patches the method dropped darkened (fixed-grid models).",
        ),
    ] = None,
    json: options.Json = False,
) -> None:
    """Answer PROMPT about IMAGE, pruning visual tokens inside the language model.

    Several images (or prompts) run as one padded batch: each sample keeps its own k tokens.
    """
    if not prompts:
        if len(arguments) < 2 and not more_images:
            raise UsageError("give an image and a prompt: asap run IMAGE PROMPT")
        *arguments, prompt = arguments
        prompts = [prompt]
    prompts = [_read_stdin() if prompt == "-" else prompt for prompt in prompts]
    for prompt in prompts:
        check_prompt(prompt)
    samples = pair_samples(expand_images([*arguments, *(more_images or [])]), prompts)
    pictures = {path: load_image(path) for path, _ in samples}
    if save_kept is not None:
        if len(samples) > 1:
            raise UsageError("--save-kept draws one image; run one sample to use it")
        figures.check_writable(save_kept, inputs=[path for path, _ in samples])
    pruning.settings(seed=sampling.seed)  # fail before a long load where the model is not needed to tell

    loaded = where.load()
    settings = pruning.settings(loaded.preset, sampling.seed)
    for prompt in prompts:
        check_text(loaded.processor, prompt)
    if len(samples) > 1:
        run_batch(loaded, settings, samples, pictures, sampling, json)
        return
    (image, prompt), picture = samples[0], pictures[samples[0][0]]
    inputs = build_inputs(loaded.processor, [user_message(prompt, 1)], [picture])
    plan = plan_for(loaded, inputs["input_ids"][0], settings)
    span_tokens = plan.spans[0][1] - plan.spans[0][0] if plan.spans else 0
    if save_kept is not None:
        figures.token_grid(span_tokens)  # a model without one square grid fails before generating
    result = generate(
        loaded,
        inputs,
        plan,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        seed=sampling.seed,
        on_text=None if json else display.write,
    )
    if json:
        display.print_json(_json_record(loaded, settings, image, prompt, result))
    else:
        display.write("\n")
        display.note(display.summary(settings, result))
    if save_kept is not None:  # after the answer is out: a failed write loses only the picture
        picture_kept = figures.kept_in_span(picture, loaded.processor.image_processor, plan.spans[0], result)
        figures.save_png(picture_kept, save_kept, inputs=[image])
        display.note(f"wrote {save_kept}")


def _read_stdin() -> str:
    """The prompt piped in; bytes that are not text become lone surrogates, which check_prompt
    refuses with one error line."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:
        return sys.stdin.read().strip()
    return raw.read().decode(getattr(sys.stdin, "encoding", None) or "utf-8", "surrogateescape").strip()


def run_batch(loaded, settings, samples, pictures, sampling, json) -> None:
    """Every sample in one left-padded batch; an answer line each, then a summary line each."""
    inputs = build_batch_inputs(loaded.processor, [(prompt, pictures[image]) for image, prompt in samples])
    plans = plans_for_batch(loaded, inputs["input_ids"], settings)
    with display.status(f"Answering {len(samples)} samples in one batch"):
        results = generate_batch(
            loaded, inputs, plans, max_tokens=sampling.max_tokens, temperature=sampling.temperature, seed=sampling.seed
        )
    several_prompts = len({prompt for _, prompt in samples}) > 1
    for (image, prompt), result in zip(samples, results, strict=True):
        if json:
            display.print_json(_json_record(loaded, settings, image, prompt, result))
        else:
            label = f"{image} [{prompt}]" if several_prompts else str(image)
            display.write(f"{label}: {result.text}\n")
    if not json:
        for (image, _), result in zip(samples, results, strict=True):
            display.note(f"{image}: {display.summary(settings, result)}")


def _json_record(loaded, settings: PruneSettings, image: Path, prompt: str, result: GenerationResult) -> dict:
    """One sample's answer and figures, as --json prints them (one object per line)."""
    return {
        **result.as_json(),
        "image": str(image),
        "prompt": prompt,
        "model": loaded.name,
        "method": settings.method,
        "k": settings.k,
        "layer": result.layer,
        "prompt_tokens": result.prompt_tokens,
        "device": str(loaded.device),
    }
