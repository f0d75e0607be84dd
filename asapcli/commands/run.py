"""asap run IMAGE PROMPT: answer one question about one image, with pruning."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from .. import display, figures
from ..generation import GenerationResult, PruneSettings, generate, plan
from ..inputs import build_inputs, check_prompt, load_image, user_message
from ..loading import load
from . import options


def run(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image file.")],
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The question; '-' reads it from stdin.")],
    model: options.Model = options.DEFAULT_MODEL,
    method: options.Method = "asap",
    k: options.K = None,
    layer: options.Layer = None,
    lambda_max: options.LambdaMax = None,
    merge_threshold: options.MergeThreshold = None,
    score_queries: options.ScoreQueries = None,
    score: options.Score = None,
    max_tokens: options.MaxTokens = 128,
    temperature: options.Temperature = 0.0,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    save_kept: Annotated[
        Path | None,
        typer.Option(
            "--save-kept",
            help="Write a PNG of the image with the patches the method dropped darkened (fixed-grid models).",
        ),
    ] = None,
    json: options.Json = False,
) -> None:
    """Answer PROMPT about IMAGE, pruning visual tokens inside the language model."""
    if prompt == "-":
        prompt = sys.stdin.read().strip()
    check_prompt(prompt)
    picture = load_image(image)
    if save_kept is not None:
        figures.check_writable(save_kept)
    settings_for = partial(
        options.prune_settings,
        method=method,
        k=k,
        layer=layer,
        lambda_max=lambda_max,
        merge_threshold=merge_threshold,
        score_queries=score_queries,
        score=score,
        seed=seed,
    )
    settings_for().check()  # fail before a long load where the model is not needed to tell

    with display.status(f"Loading {model}"):
        loaded = load(model, device=device, dtype=dtype)
    settings = settings_for(loaded.preset)
    inputs = build_inputs(loaded.processor, [user_message(prompt, 1)], [picture])
    pruning = plan(loaded, inputs["input_ids"][0], settings)
    span_tokens = pruning.spans[0][1] - pruning.spans[0][0] if pruning.spans else 0
    if save_kept is not None:
        figures.token_grid(span_tokens)  # a model without one square grid fails before generating
    result = generate(
        loaded,
        inputs,
        pruning,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        on_text=None if json else display.write,
    )
    if save_kept is not None:
        start, end = pruning.spans[0]
        kept = [position - start for position in (result.kept_positions or [range(start, end)])[0]]
        picture_kept = figures.kept_picture(picture, loaded.processor.image_processor, span_tokens, kept)
        figures.save_png(picture_kept, save_kept)
    if json:
        display.print_json(
            {
                "answer": result.text,
                "model": model,
                "method": settings.method,
                "k": settings.k,
                "layer": result.layer,
                "visual_tokens_before": result.visual_tokens,
                "visual_tokens_after": result.kept_tokens,
                "merged_tokens": result.merged_tokens,
                "flops_ratio": result.flops_ratio,
                "prefill_seconds": result.prefill_seconds,
                "tokens_per_second": result.decode_tokens_per_second,
                "prompt_tokens": result.prompt_tokens,
                "generated_tokens": result.generated_tokens,
                "device": str(loaded.device),
            }
        )
    else:
        display.write("\n")
        display.note(summary(settings, result))


def summary(settings: PruneSettings, result: GenerationResult) -> str:
    head = f"{settings.method} k={settings.k} L={result.layer}: "
    if settings.method == "vanilla":
        kept = f"all {result.visual_tokens} visual tokens kept (no pruning)"
    elif not result.pruned:
        kept = f"k >= {result.visual_tokens} visual tokens, nothing pruned"
    else:
        kept = f"kept {result.kept_tokens}/{result.visual_tokens} visual tokens"
        if result.merged_tokens:
            kept += f" ({result.merged_tokens} merged and refilled)"
    return (
        f"{head}{kept}; FLOPs {result.flops_ratio:.1%} of vanilla; "
        f"prefill {result.prefill_seconds:.3f} s; decode {result.decode_tokens_per_second:.1f} tokens/s"
    )
