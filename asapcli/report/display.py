"""Everything the commands show: stdout carries answers and JSON, stderr everything else."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from ..engine.settings import PruneSettings
    from ..runtime.generation import GenerationResult

# Spinners, progress and warnings go to stderr; colour only on a terminal. `out` is for the
# result a command exists to show (a table), `err` for everything around it.
# The exit status of a command whose reader went away (`asap ... | head`), quietly, as cat's.
BROKEN_PIPE = 141


def end_on_broken_pipe() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush has nowhere to fail
    raise SystemExit(BROKEN_PIPE)


class _Stdout(Console):
    def on_broken_pipe(self) -> None:  # rich's hook; its own ends with status 1, a user error's here
        end_on_broken_pipe()


err = Console(stderr=True, highlight=False)
out = _Stdout(highlight=False)
if not out.is_terminal and "COLUMNS" not in os.environ:
    out.width = 160  # a table piped to a file or a CI log is not cut at 80 columns


def status(message: str):
    """A spinner on stderr while something slow runs; nothing when stderr is not a terminal."""
    return err.status(message) if err.is_terminal else nullcontext()


PLAIN_PROGRESS_SECONDS = 10.0


@contextmanager
def progress() -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """Progress on stderr while a long task runs: bars on a terminal; off one (a pipe, a CI log)
    a plain line every PLAIN_PROGRESS_SECONDS, so a long run is never silent. Yields `add(what,
    total)`, which starts a task and returns the function that advances it by one."""
    if not err.is_terminal:
        yield _plain_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bars:

        def add(description: str, total: int) -> Callable[[], None]:
            task = bars.add_task(description, total=total)
            return lambda: bars.advance(task)

        yield add


def _plain_progress(description: str, total: int) -> Callable[[], None]:
    started = last = time.monotonic()
    done = 0

    def advance() -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if now - last >= PLAIN_PROGRESS_SECONDS or done == total:
            last = now
            note(f"{description}: {done}/{total} ({now - started:.0f} s)")

    return advance


FORMATS = ("table", "json", "csv", "markdown", "latex")


def table(title: str, headers: list[str]):
    """A results table that reads at 80 columns: light rules, short headers (units go in the
    header or the caption), and a cell too wide for its column wrapped, never cut to '…'."""
    from rich import box
    from rich.table import Table

    result = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0, min_width=len(title)
    )  # a title wider than the columns would wrap
    for index, header in enumerate(headers):
        result.add_column(header, justify="left" if index == 0 else "right", overflow="fold")
    return result


def flat(record: dict, prefix: str = "") -> dict:
    """One table row from a record: nested objects flattened to `outer.inner` columns, lists of
    numbers kept (print_rows joins them with ';'; lists of objects are left out: they are rows
    of their own)."""
    row = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            row.update(flat(value, f"{name}."))
        elif isinstance(value, list):
            if all(not isinstance(item, dict | list) for item in value):
                row[name] = value
        else:
            row[name] = value
    return row


def print_rows(rows: list[dict], format_: str) -> None:
    """Rows (dicts, one key set) on stdout as CSV (every digit kept, empty for null), a Markdown
    table or a LaTeX tabular (numbers to 4 significant digits, '-' for null)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if format_ == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: _csv_cell(row.get(key)) for key in columns} for row in rows)
        sys.stdout.flush()
        return
    cells = [[_cell(row.get(key)) for key in columns] for row in rows]
    if format_ == "markdown":
        lines = [columns, ["---"] * len(columns), *cells]  # a '|' in a cell (a model's path) would split it
        write("".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |\n" for line in lines))
        return
    escape = str.maketrans({char: "\\" + char for char in "&%$#_{}"})
    body = [" & ".join(cell.translate(escape) for cell in line) + r" \\" for line in [columns, *cells]]
    body.insert(1, r"\hline")
    write("\\begin{tabular}{" + "l" * len(columns) + "}\n" + "\n".join(body) + "\n\\end{tabular}\n")


def _csv_cell(value):
    if isinstance(value, list):
        return ";".join(str(item) for item in value)
    return "" if value is None else value


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ";".join(_cell(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_json(data) -> None:
    """One JSON object on a line of stdout; a record (asapcli.records) is written by its fields."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def note(message: str) -> None:
    """A one-line summary on stderr, never wrapped (scripts grep it)."""
    err.print(message, markup=False, style="dim", soft_wrap=True)


def error(message: str) -> None:
    err.print(f"Error: {message}", markup=False, soft_wrap=True)


def flop_unit(flop_count: float) -> tuple[str, float]:
    """The unit that shows `flop_count` with a few significant digits (tiny models count MFLOPs)."""
    for name, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9)):
        if flop_count >= 0.1 * scale:
            return name, scale
    return "MFLOPs", 1e6


def speeds(result: GenerationResult) -> str:
    """How fast one generation ran, saying what a figure includes; no decode rate over too few
    tokens to mean anything."""
    prefill = f"prefill {result.prefill_seconds:.3f} s"
    if result.cold:
        prefill += " (first call: includes warm-up)"
    if result.decode_tokens_per_second is None:
        from ..runtime.generation import MIN_DECODE_TOKENS  # loaded already: a generation has run

        decoded = max(result.generated_tokens - 1, 0)  # the first token came with the prefill
        plural = "" if decoded == 1 else "s"
        return f"{prefill}; decode not timed ({decoded} decoded token{plural}, fewer than {MIN_DECODE_TOKENS})"
    return f"{prefill}; decode {result.decode_tokens_per_second:.1f} tokens/s"


def summary(settings: PruneSettings, result: GenerationResult) -> str:
    """The line after an answer: what the method kept and saved, and how fast it ran."""
    if not settings.method.prunes:  # k and L mean nothing to it
        head, kept = f"{settings.method}: ", f"all {result.visual_tokens} visual tokens kept (no pruning)"
    else:
        head = f"{settings.method} k={settings.k} L={result.layer}: "
        if not result.pruned:
            kept = f"k >= {result.visual_tokens} visual tokens, nothing pruned"
        else:
            kept = f"kept {result.kept_tokens}/{result.visual_tokens} visual tokens"
            if result.merged_tokens:
                kept += f" ({result.merged_tokens} merged and refilled)"
    return f"{head}{kept}; FLOPs {result.flops_ratio:.1%} of vanilla; {speeds(result)}{cut(result)}"


def cut(result: GenerationResult) -> str:
    """What cut an answer short, said after its figures; nothing when the model ended it."""
    if result.ended == "max-tokens":
        plural = "" if result.generated_tokens == 1 else "s"
        return f"; answer cut at --max-tokens ({result.generated_tokens} token{plural})"
    if result.ended == "context":
        return "; answer cut: the model's context is full"
    return ""
