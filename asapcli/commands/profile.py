"""asap profile: prefill cost of several methods at one or more budgets, side by side in one run
(the layout of the paper's Table 4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..records import ProfileRow
from ..report import display
from ..runtime.presets import model_label
from . import options

IMAGE_HELP = "The image. Default: a built-in test pattern (what it shows does not change the cost)."
PROMPT_HELP = "The question asked about the image."
REPEATS_HELP = "Timed rounds, one prefill per method each; the median is shown."
BATCH_HELP = "Also run N copies of the sample as one batch, beside batch 1, and compare their images/s."


@options.command
def profile(
    *,
    where: options.Where,
    image: Annotated[Path | None, typer.Option("--image", "-i", metavar="FILE", help=IMAGE_HELP)] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help=PROMPT_HELP)] = "Describe the image.",
    comparison: options.Comparison,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", min=1, help=REPEATS_HELP)] = 5,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, help="Untimed prefills before them.")] = 1,
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", metavar="N", min=1, help="Tokens decoded to time decoding.")
    ] = 16,
    # --batch: N copies are built at once; beyond 1024, memory, then an integer overflow
    batch: Annotated[int, typer.Option("--batch", metavar="N", min=1, max=1024, help=BATCH_HELP)] = 1,
    json: options.json_flag("one JSON object per method and budget (JSON Lines)") = False,
    format_: options.Format = None,
) -> None:
    """Measure prefill time, peak memory, KV cache and decoding speed per method and budget."""
    # The work's modules import torch: here, not at the top, so that `asap --help` starts in a blink.
    from ..measure import profiling
    from ..runtime.inputs import check_prompt, load_image, pattern_image

    output = options.output_format(format_, json)
    grid = comparison.grid(where.preset)  # made and checked before the long load
    where.check(grid.runs())
    check_prompt(prompt)
    picture = load_image(image) if image is not None else None

    loaded = where.load()
    picture = picture or pattern_image(*(loaded.preset.pattern if loaded.preset else ()))
    runs = profiling.runs(grid, loaded.num_layers)
    with display.progress() as tasks:
        step = tasks("Prefills and decodes", profiling.step_count(len(runs), len({1, batch}), warmup, repeats))
        rows = profiling.profile(
            loaded, model=where.model, prompt=prompt, picture=picture, settings=runs, batch=batch,
            repeats=repeats, warmup=warmup, decode_tokens=decode_tokens, on_step=step,
        )  # fmt: skip

    _show(rows, output, loaded.device, grid.methods, batch)


def _show(rows: list[ProfileRow], output: str, device, methods, batch: int) -> None:
    """The rows as --json / --format say; a table says under it how each figure was measured."""
    import torch

    from ..measure import profiling

    if output == "json":
        for row in rows:
            display.print_json(row)
        return
    if output == "csv":
        display.print_csv([display.flat(dataclasses.asdict(row)) for row in rows])
        return
    on_gpu = device.type == "cuda"
    display.show(_table(rows, on_gpu, batched=batch > 1), output)
    if output != "table":
        return
    gpu_name = torch.cuda.get_device_name(device) if on_gpu else None
    for line in profiling.how_measured(rows[0], methods, batch, gpu_name):
        display.out.print(line, markup=False, soft_wrap=True)


def _table(rows: list[ProfileRow], on_gpu: bool, batched: bool) -> display.Shown:
    columns = [
        ("method", lambda row: row.method),
        ("k", lambda row: "-" if row.k is None else str(row.k)),
        *([("n", lambda row: str(row.batch))] if batched else []),
        ("kept", lambda row: str(row.kept_tokens)),
        ("TFLOPs", lambda row: f"{row.tflops:.4f}"),
        ("FLOPs\n%", lambda row: f"{row.flops_ratio * 100:.1f}"),
        ("prompt\n%", lambda row: f"{row.prompt_flops_ratio * 100:.1f}"),
        ("KV\nMB", lambda row: f"{row.kv_cache_bytes / 2**20:.1f}"),
        ("peak\nMB", lambda row: f"{row.peak_memory_bytes / 2**20:.1f}"),
        ("ms", lambda row: f"{row.prefill_seconds * 1000:.1f}"),
        ("time\n%", lambda row: "-" if row.time_ratio is None else f"{row.time_ratio * 100:.1f}"),
        *(
            [
                ("img/s", lambda row: f"{row.images_per_second:.2f}"),
                ("vs 1", lambda row: f"{row.throughput_ratio:.2f}x"),
            ]
            if batched
            else []
        ),
        ("tok/s", lambda row: f"{row.decode_tokens_per_second:.1f}"),
    ]
    what = "one image" + (", batch 1 and batched" if batched else "")
    first = rows[0]
    label = model_label(first.model, first.random_weights, first.decoder_layers, first.decoder_layers_full)
    table = display.Shown(f"{label}: prefill of {what}", [header for header, _ in columns], keys=2)
    for row in rows:
        table.add_row(*(cell(row) for _, cell in columns))
    return table
