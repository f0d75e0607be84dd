"""Everything the commands show: stdout carries answers and JSON, stderr everything else."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bars:

        def add(description: str, total: int) -> Callable[[], None]:
            task = bars.add_task(description, total=total)
            return lambda: bars.advance(task)

        yield add


def _plain_progress(description: str, total: int) -> Callable[[], None]:
    """A line at most every PLAIN_PROGRESS_SECONDS, and one at the end of a task that said
    something before: done/total, the time so far, the rate and, from it, the time left."""
    started = last = time.monotonic()
    done = said = 0

    def advance() -> None:
        nonlocal done, last, said
        done += 1
        now = time.monotonic()
        # the last line only after others: a task too short for them needs no word at its end
        if now - last >= PLAIN_PROGRESS_SECONDS or (done == total and said):
            last, said = now, said + 1
            note(f"{description}: {done}/{total} ({_pace(done, total, now - started)})")

    return advance


def _pace(done: int, total: int, elapsed: float) -> str:
    """`12 s, 3.4/s, about 20 s left` (no rate or time left before a second has passed)."""
    said = f"{elapsed:.0f} s"
    if elapsed < 1 or done >= total:
        return said
    rate = done / elapsed
    left = (total - done) / rate
    pace = f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f} s each"
    return f"{said}, {pace}, about {_duration(left)} left"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


FORMATS = ("table", "json", "csv", "markdown", "latex")


@dataclasses.dataclass
class Shown:
    """A results table as a reader sees it: the cells as text (numbers formatted, '-' for none), a
    rule above the rows listed in `rules`. The same cells print as a rich table on a terminal and
    as Markdown or LaTeX (`--format`, through tabulate: what a paper or a README pastes).
    `keys`: the leading columns that name a row (method, k), repeated in each block when the
    table is wider than the terminal and goes out in blocks of columns."""

    title: str
    headers: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    rules: set[int] = dataclasses.field(default_factory=set)
    keys: int = 1
    left: int = 1  # the leading columns aligned left (words); the rest are numbers, right

    def add_row(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def add_section(self) -> None:
        self.rules.add(len(self.rows))


def show(shown: Shown, format_: str = "table") -> None:
    """`shown` on stdout as a rich table (in blocks of columns that fit the terminal), a Markdown
    table or a LaTeX tabular (booktabs)."""
    if format_ == "table":
        for index, block in enumerate(_blocks(shown, out.width)):
            if index:
                out.print()
            out.print(_rich(shown, block, shown.title if index == 0 else None, out.width))
        return
    from tabulate import tabulate

    headers = [header.replace("\n", " ") for header in shown.headers]
    align = ["left"] * shown.left + ["right"] * (len(headers) - shown.left)
    if format_ == "markdown":  # a '|' in a cell or a header (a path, a question type) would split it
        rows = [[cell.replace("|", "\\|") for cell in row] for row in shown.rows]
        headers = [header.replace("|", "\\|") for header in headers]
        write(tabulate(rows, headers, tablefmt="github", colalign=align, disable_numparse=True) + "\n")
        return
    write(tabulate(shown.rows, headers, tablefmt="latex_booktabs", colalign=align, disable_numparse=True) + "\n")


def _widths(shown: Shown) -> list[int]:
    lines = [header.split("\n") for header in shown.headers]
    return [max([len(part) for part in lines[i]] + [len(row[i]) for row in shown.rows]) for i in range(len(lines))]


def _blocks(shown: Shown, width: int) -> list[list[int]]:
    """The columns of each block: all in one where they fit `width`, else the key columns then as
    many others as fit, block after block (a number is never broken across lines)."""
    widths = _widths(shown)
    keys = list(range(min(shown.keys, len(widths))))
    blocks, block = [], list(keys)
    for column in range(len(keys), len(widths)):
        used = sum(widths[i] + 1 for i in block)
        if used + widths[column] > width and len(block) > len(keys):
            blocks.append(block)
            block = [*keys]
        block.append(column)
    blocks.append(block)
    return blocks


def _rich(shown: Shown, columns: list[int], title: str | None, width: int):
    """One block of the table as rich draws it: light rules, short headers (units go in the header
    or the caption), as wide as its title where the terminal has room (the title would wrap)."""
    from rich import box
    from rich.table import Table

    wide = min(len(title or ""), width)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0, min_width=wide)
    for i in columns:
        table.add_column(shown.headers[i], justify="left" if i < shown.left else "right", no_wrap=True)
    for index, row in enumerate(shown.rows):
        if index in shown.rules:
            table.add_section()
        table.add_row(*(row[i] for i in columns))
    return table


def flat(record: dict, prefix: str = "") -> dict:
    """One table row from a record: nested objects flattened to `outer.inner` columns, lists of
    numbers kept (print_csv joins them with ';'), and a list of objects of one shape (flops'
    stages) as one list column per field, `stages.tokens`; other lists of objects are left out
    (they are rows of their own)."""
    row = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            row.update(flat(value, f"{name}."))
        elif isinstance(value, list):
            if all(not isinstance(item, dict | list) for item in value):
                row[name] = value
            elif _one_shape(value):
                row.update({f"{name}.{field}": [item[field] for item in value] for field in value[0]})
        else:
            row[name] = value
    return row


def _one_shape(items: list) -> bool:
    """Objects with the same fields, each a plain value: a list column each."""
    return bool(items) and all(
        isinstance(item, dict)
        and item.keys() == items[0].keys()
        and not any(isinstance(v, dict | list) for v in item.values())
        for item in items
    )


def print_csv(rows: list[dict]) -> None:
    """Records (dicts) on stdout as CSV: every digit kept, empty for null, lists of numbers joined
    with ';'. A key some rows lack (vanilla's options) takes its place among the others."""
    import csv

    columns: list[str] = []
    for row in rows:
        for previous, key in zip([None, *row], row):
            if key not in columns:
                columns.insert(columns.index(previous) + 1 if previous is not None else 0, key)
    writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _csv_cell(row.get(key)) for key in columns} for row in rows)
    sys.stdout.flush()


def _csv_cell(value):
    if isinstance(value, list):
        return ";".join(str(_csv_cell(item)) for item in value)
    if isinstance(value, bool):  # as JSON writes them, not Python's True
        return "true" if value else "false"
    return "" if value is None else value


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


def warning(message: str) -> None:
    """One line on stderr that a result should not be read as it stands, never wrapped."""
    err.print(f"Warning: {message}", markup=False, style="yellow", soft_wrap=True)


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
    # one sample, not a median: `asap profile` measures with a spread
    prefill = f"prefill {result.prefill_seconds:.3f} s (one sample, {result.timed_on}"
    prefill += "; first call: includes warm-up)" if result.cold else ")"
    if result.decode_tokens_per_second is None:
        from ..runtime.generation import MIN_DECODE_TOKENS  # loaded already: a generation has run

        made = f"{result.generated_tokens} token{'' if result.generated_tokens == 1 else 's'} generated"
        # the first token comes with the prefill: a rate needs MIN_DECODE_TOKENS after it
        return f"{prefill}; decode rate not shown ({made}; a rate needs {MIN_DECODE_TOKENS + 1})"
    return f"{prefill}; decode {result.decode_tokens_per_second:.1f} tokens/s"


def kept_roles(result: GenerationResult) -> str:
    """What the kept tokens are, where they are not all of one kind, and how many pruned tokens
    were merged into them: ' (selected 2, anchor 15, refilled 111; 111 others merged into them)'."""
    from ..engine.methods import ROLES

    roles = Counter(role for span in result.pruning.spans for role in span.roles)
    order = sorted(roles, key=lambda role: list(ROLES).index(role) if role in ROLES else len(ROLES))
    parts = ", ".join(f"{role} {roles[role]}" for role in order) if len(roles) > 1 else ""
    merged = f"{result.merged_tokens} others merged into them" if result.merged_tokens else ""
    said = "; ".join(part for part in (parts, merged) if part)
    return f" ({said})" if said else ""


def summary(settings: PruneSettings, result: GenerationResult) -> str:
    """The line after an answer: what the method kept and saved, and how fast it ran."""
    if not settings.method.prunes:  # k and L mean nothing to it
        head, kept = f"{settings.method}: ", f"all {result.visual_tokens} visual tokens kept (no pruning)"
    else:
        compact = " (compact KV cache)" if settings.method.compacts else ""
        head = f"{settings.method} k={settings.k} L={result.layer}{compact}: "
        if not result.pruned:
            kept = f"k >= {result.visual_tokens} visual tokens, nothing pruned"
        else:
            kept = f"kept {result.kept_tokens}/{result.visual_tokens} visual tokens{kept_roles(result)}"
            if result.k_unmet:
                kept += f" (k={settings.k} unmet: {result.k_unmet})"
    return f"{head}{kept}; FLOPs {result.flops_ratio:.1%} of vanilla; {speeds(result)}{cut(result)}"


def cut(result: GenerationResult) -> str:
    """What cut an answer short, said after its figures; nothing when the model ended it."""
    if result.ended == "max-tokens":
        plural = "" if result.generated_tokens == 1 else "s"
        return f"; answer cut at --max-tokens ({result.generated_tokens} token{plural})"
    if result.ended == "context":
        return "; answer cut: the model's context is full"
    return ""
