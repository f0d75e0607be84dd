"""asap profile: prefill cost of several methods at one or more budgets, side by side in one run
(the layout of the paper's Table 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from .. import display
from ..engine import METHODS
from ..inputs import build_batch_inputs, check_prompt, load_image, pattern_image
from ..profiling import Measurement, conditions, how_measured, measure
from . import options


@options.command
def profile(
    *,
    where: options.Where,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image", help="The image. Default: a built-in test pattern (what it shows does not change the cost)."
        ),
    ] = None,
    prompt: Annotated[
        str, typer.Option("--prompt", help="The question asked about the image.")
    ] = "Describe the image.",
    methods: Annotated[
        str, typer.Option("--methods", help=f"Comma-separated methods to compare, from {', '.join(METHODS)}.")
    ] = "vanilla,fastv,asap",
    budgets: options.Budgets = None,
    layer: options.Layer = None,
    hyperparameters: options.MethodOptions,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="Timed rounds, one prefill per method each; the median is shown.")
    ] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed prefills before them.")] = 1,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", min=1, help="Tokens decoded to time decoding.")] = 16,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=1,
            max=1024,  # N copies are built at once: beyond this, memory, then an integer overflow
            help="Also run N copies of the sample as one batch, beside batch 1, and compare their images/s.",
        ),
    ] = 1,
    threads: options.Threads = None,
    seed: options.Seed = 0,
    json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per method and budget (JSON Lines).")
    ] = False,
) -> None:
    """Measure prefill time, peak memory, KV cache and decoding speed per method and budget."""
    names = options.method_list(methods)
    options.prune_settings(names, hyperparameters)  # fail before the long load
    ks = options.budget_list(budgets) or [None]
    check_prompt(prompt)
    picture = load_image(image) if image is not None else pattern_image()
    if threads is not None:
        torch.set_num_threads(threads)

    loaded = where.load()
    batches = [build_batch_inputs(loaded.processor, [(prompt, picture)] * size) for size in sorted({1, batch})]
    base = options.prune_settings(names, hyperparameters, loaded.preset, layer=layer, seed=seed)
    runs = [
        base.for_method(name, k)
        for name in names
        for k in (ks[:1] if name == "vanilla" else ks)  # vanilla does not depend on k
    ]
    layer = runs[0].layer
    for settings in runs:
        settings.check(loaded.num_layers)

    with display.status(f"Measuring {len(runs)} runs") as spinner:
        results = measure(loaded, batches, runs, repeats, warmup, decode_tokens, _progress(spinner))

    on_gpu = loaded.device.type == "cuda"
    context = {
        "model": where.model,
        **conditions(loaded, layer, int(batches[0]["input_ids"].shape[1]), repeats, warmup),
    }
    if json:
        for result in results:
            display.print_json({**context, **_record(result, results)})
        return
    display.out.print(_table(results, on_gpu, context, batched=batch > 1))
    notes = how_measured(context, names, batch, torch.cuda.get_device_name(loaded.device) if on_gpu else None)
    for line in notes:
        display.out.print(line, markup=False, soft_wrap=True)


def _progress(spinner):
    """Step messages for the spinner, when there is one (a terminal)."""
    return None if spinner is None else lambda step: spinner.update(f"Measuring: {step}")


def _vanilla(result: Measurement, results: list[Measurement]) -> Measurement | None:
    """Vanilla's measurement at the same batch size."""
    return next((other for other in results if other.method == "vanilla" and other.batch == result.batch), None)


def _single(result: Measurement, results: list[Measurement]) -> Measurement:
    """The same method and budget at batch 1."""
    return next(other for other in results if (other.method, other.k, other.batch) == (result.method, result.k, 1))


def _record(result: Measurement, results: list[Measurement]) -> dict:
    vanilla = _vanilla(result, results)
    return {
        "method": result.method,
        "k": result.k,
        "batch": result.batch,
        "visual_tokens": result.visual_tokens,
        "kept_tokens": result.kept_tokens,
        "merged_tokens": result.merged_tokens,
        "tflops": result.tflops,
        "flops_ratio": result.flops_ratio,
        "prompt_flops_ratio": result.prompt_flops_ratio,
        "kv_cache_bytes": result.kv_cache_bytes,
        "peak_memory_bytes": result.peak_memory_bytes,
        "prefill_seconds": result.prefill_median,
        "prefill_seconds_all": result.prefill_seconds,
        "time_ratio": result.prefill_median / vanilla.prefill_median if vanilla else None,
        "images_per_second": result.images_per_second,
        "throughput_ratio": result.images_per_second / _single(result, results).images_per_second,
        "decode_tokens_per_second": result.decode_tokens_per_second,
    }


def _table(results: list[Measurement], on_gpu: bool, context: dict, batched: bool) -> Table:
    memory, time = ("GPU peak MB", "CUDA ms") if on_gpu else ("CPU peak MB", "CPU ms")
    columns = [
        "method",
        "k",
        *(["batch"] if batched else []),
        "tokens",
        "TFLOPs",
        "FLOPs %",
        "prompt %",
        "KV MB",
        memory,
        f"prefill {time}",
        "time %",
        *(["images/s", "vs batch 1"] if batched else []),
        "decode tok/s",
    ]
    what = "one image" + (", batch 1 and batched" if batched else "")
    table = Table(title=f"{context['model']}: prefill of {what}", title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for result in results:
        vanilla = _vanilla(result, results)
        single = _single(result, results)
        table.add_row(
            result.method,
            "-" if result.k is None else str(result.k),
            *([str(result.batch)] if batched else []),
            f"{result.kept_tokens}/{result.visual_tokens}",
            f"{result.tflops:.4f}",
            f"{result.flops_ratio:.1%}",
            f"{result.prompt_flops_ratio:.1%}",
            f"{result.kv_cache_bytes / 2**20:.1f}",
            f"{result.peak_memory_bytes / 2**20:.1f}",
            f"{result.prefill_median * 1000:.1f}",
            f"{result.prefill_median / vanilla.prefill_median:.1%}" if vanilla else "-",
            *(
                [f"{result.images_per_second:.2f}", f"{result.images_per_second / single.images_per_second:.2f}x"]
                if batched
                else []
            ),
            f"{result.decode_tokens_per_second:.1f}",
        )
    return table
