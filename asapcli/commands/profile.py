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
REPEATS_HELP = (
    "Timed rounds, one prefill per method each: the median, its IQR and the time ratio's 95% interval are shown "
    "(6 rounds or more for 95%)."
)
BATCH_HELP = "Also run N copies of the sample as one batch, beside batch 1, and compare their images/s."


@options.command
def profile(
    *,
    where: options.Where,
    image: Annotated[Path | None, typer.Option("--image", "-i", metavar="FILE", help=IMAGE_HELP)] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help=PROMPT_HELP)] = "Describe the image.",
    comparison: options.Comparison,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", min=1, help=REPEATS_HELP)] = 10,
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
    from ..runtime.inputs import check_prompt, load_image, pattern_image  # light: no torch yet

    output = options.output_format(format_, json)
    grid = comparison.grid(where)  # made and checked before the long load
    where.check(grid.runs())
    check_prompt(prompt)
    picture = load_image(image) if image is not None else None
    from ..measure import profiling  # imports torch and transformers: after the user's input is checked

    loaded = where.load()
    picture = picture or pattern_image(*(loaded.preset.pattern if loaded.preset else ()))
    runs = profiling.runs(grid, loaded.num_layers)
    with display.progress() as tasks:
        step = tasks("Prefills and decodes", profiling.step_count(len(runs), len({1, batch}), warmup, repeats))
        rows = profiling.profile(
            loaded, model=where.model, prompt=prompt, picture=picture, settings=runs, batch=batch,
            repeats=repeats, warmup=warmup, decode_tokens=decode_tokens, on_step=step,
        )  # fmt: skip

    _warn(rows)  # first: on a terminal it stands above the table whose cells it marks
    _show(rows, output, grid.methods, batch)


def _warn(rows: list[ProfileRow]) -> None:
    """One line on stderr when a timing cannot be trusted, naming why and what to do (pyperf's and
    hyperfine's warning): what holds for the whole run once (the machine's load, too few rounds or
    steps), then row by row; the table marks the cells with "!", the JSON says `stable: false` and why."""
    from ..measure.stability import RUN_WIDE, advice

    run = dict.fromkeys(why for row in rows for cause, why in row.unstable.items() if cause in RUN_WIDE)
    said = [
        f"{_name(row)}: {'; '.join(why for cause, why in row.unstable.items() if cause not in RUN_WIDE)}"
        for row in rows
        if set(row.unstable) - set(RUN_WIDE)
    ]
    if run or said:
        causes = list(dict.fromkeys(cause for row in rows for cause in row.unstable))
        reasons = "; ".join([*run, *said])
        display.warning(f"these timings may be unreliable: {reasons}. Try {advice(causes, rows[0].threads)}.")


def _show(rows: list[ProfileRow], output: str, methods, batch: int) -> None:
    """The rows as --json / --format say; a table says under it how each figure was measured."""
    from ..measure import profiling

    if output == "json":
        for row in rows:
            display.print_json(row)
        return
    if output == "csv":  # the causes in one column, so that every run has the same columns
        records = [dataclasses.asdict(row) | {"unstable": ";".join(row.unstable)} for row in rows]
        display.print_csv([display.flat(record) for record in records])
        return
    display.show(_table(rows, batched=batch > 1), output)
    if output != "table":
        return
    for line in profiling.how_measured(rows, methods, batch) + _undecided(rows):
        display.out.print(line, markup=False, soft_wrap=True)


def _name(row: ProfileRow) -> str:
    name = row.method if row.k is None else f"{row.method} k={row.k}"
    return name + (f" n={row.batch}" if row.batch > 1 else "")


def _undecided(rows: list[ProfileRow]) -> list[str]:
    """What this run cannot tell apart by time (never a bare ranking from noise): per budget, the
    methods whose time ratios' intervals overlap, and those whose interval holds vanilla's 100%;
    nothing at all under 95% confidence (too few rounds)."""
    from ..measure.stability import CONFIDENCE, Interval, indistinct

    timed = [row for row in rows if row.k is not None and row.time_ratio_interval is not None]
    if not timed:
        return []
    if (timed[0].time_ratio_confidence or 0.0) < CONFIDENCE:
        return [f"{timed[0].repeats} rounds: too few for a 95% interval; this run tells no method apart from another."]
    lines = []
    for k, batch in dict.fromkeys((row.k, row.batch) for row in timed):
        where = f"k={k}" + (f", n={batch}" if batch > 1 else "")
        same = [row for row in timed if (row.k, row.batch) == (k, batch)]
        intervals = {
            row.method: Interval(row.time_ratio, *row.time_ratio_interval, row.time_ratio_confidence) for row in same
        }
        for group in indistinct(intervals):
            lines.append(f"{where}: {', '.join(group)} take the same time within their intervals (not told apart).")
        vanilla_like = [row.method for row in same if row.time_ratio_interval[0] <= 1.0 <= row.time_ratio_interval[1]]
        if vanilla_like:
            lines.append(f"{where}: {', '.join(vanilla_like)} not told apart from vanilla (the interval holds 100%).")
    return lines


def _marked(row: ProfileRow, cell: str, text: str) -> str:
    """A timing cell, with "!" where the run's verdict says it cannot be trusted."""
    from ..measure.stability import Verdict

    return text + "!" if Verdict(row.unstable).marks(cell) else text


def _ratio_cells(row: ProfileRow) -> tuple[str, str]:
    """time % and its interval; vanilla's is 100 by construction, never marked."""
    if row.time_ratio is None:
        return "-", "-"
    if row.k is None:
        return "100.0", "-"
    low, high = row.time_ratio_interval
    return _marked(row, "ratio", f"{row.time_ratio * 100:.1f}"), f"{low * 100:.1f}-{high * 100:.1f}"


def _confidence(rows: list[ProfileRow]) -> str:
    """The intervals' confidence as the column's header says it: 95% (at least) from 6 rounds, less below."""
    confidence = next((row.time_ratio_confidence for row in rows if row.time_ratio_confidence is not None), None)
    if confidence is None:
        return "-"
    return "95%" if confidence >= 0.95 else f"{confidence:.0%}"


def _table(rows: list[ProfileRow], batched: bool) -> display.Shown:
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
        ("ms", lambda row: _marked(row, "prefill", f"{row.prefill_seconds * 1000:.1f}")),
        ("IQR\n%", lambda row: f"{row.prefill_seconds_iqr / row.prefill_seconds * 100:.0f}"),
        ("time\n%", lambda row: _ratio_cells(row)[0]),
        (f"{_confidence(rows)}\ninterval", lambda row: _ratio_cells(row)[1]),
        *(
            [
                ("img/s", lambda row: f"{row.images_per_second:.2f}"),
                ("vs 1", lambda row: f"{row.throughput_ratio:.2f}x"),
            ]
            if batched
            else []
        ),
        ("tok/s", lambda row: _marked(row, "decode", f"{row.decode_tokens_per_second:.1f}")),
    ]
    what = "one image" + (", batch 1 and batched" if batched else "")
    if any(row.kv_cache == "compact" for row in rows):
        what += ", compact KV cache"
    first = rows[0]
    label = model_label(first.model, first.random_weights, first.decoder_layers, first.decoder_layers_full)
    table = display.Shown(f"{label}: prefill of {what}", [header for header, _ in columns], keys=2)
    for row in rows:
        table.add_row(*(cell(row) for _, cell in columns))
    return table
