"""asap eval: accuracy per method and budget on a question set (the layout of the paper's
Table 1), optionally plotted, and the attention shift made visible."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import UsageError
from ..records import EvalReport
from ..report import display
from . import options

if TYPE_CHECKING:
    from .eval_run import EvalRun, Outcome

DATA_HELP = (
    'JSONL of {"image": path, "question": str, "answer": str} (optional "type"), images relative '
    "to the file. Default: the demo model's held-out synthetic scenes."
)
N_HELP = "Questions to ask (default: 200, or all of --data)."
BATCH_HELP = (
    "Questions answered together in one padded batch: the same answers; faster where the device "
    "has room to spare (a GPU), not on a busy CPU."
)
PLOT_HELP = (
    "Write a figure of accuracy against FLOPs, a line per method, each point labelled with its k, 95% "
    "intervals as error bars, vanilla as a reference line (.png, .svg, .pdf, .jpg or .webp)."
)
ATTENTION_PROFILE_HELP = (
    "Also write a figure of the mean attention the scoring queries pay to each patch at layer L-1, causal "
    "and SG-BiMask side by side with their difference and the per-row profile (two more passes over the questions)."
)
LOG_HELP = (
    "Write every answer as a JSON line (method, k, question, expected, answer, correct) as it "
    "comes: an interrupted run leaves what it answered."
)
PROMPT_SUFFIX_HELP = (
    "A line after each question. Default: LLaVA's 'Answer the question using a single word or phrase.', "
    "none for the bundled demo model; '' for none."
)


@options.command
def eval_command(
    *,
    where: options.WhereAnswering,
    data: Annotated[Path | None, typer.Option("--data", metavar="FILE.jsonl", help=DATA_HELP)] = None,
    n: Annotated[int | None, typer.Option("-n", "--n", metavar="N", min=1, help=N_HELP)] = None,
    comparison: options.EvalComparison,
    max_tokens: options.max_tokens("Most tokens per answer.") = 10,
    batch: Annotated[int, typer.Option("--batch", metavar="N", min=1, help=BATCH_HELP)] = 1,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE", help=PLOT_HELP)] = None,
    attention_profile: Annotated[
        Path | None, typer.Option("--attention-profile", metavar="FILE", help=ATTENTION_PROFILE_HELP)
    ] = None,
    log: Annotated[Path | None, typer.Option("--log", "--log-samples", metavar="FILE", help=LOG_HELP)] = None,
    prompt_suffix: Annotated[
        str | None, typer.Option("--prompt-suffix", metavar="TEXT", help=PROMPT_SUFFIX_HELP)
    ] = None,
    json: options.json_flag("one JSON object with every row instead of a table") = False,
    format_: options.Format = None,
) -> None:
    """Accuracy of each method at each budget: per question type, average, relative to vanilla."""
    output = options.output_format(format_, json)
    grid = comparison.grid(where)  # made and checked before the long load
    where.check(grid.runs())
    if plot is not None and not any(method.prunes for method in grid.methods):
        raise UsageError("--plot draws accuracy against FLOPs of pruning methods; name one in --methods beside vanilla")
    if where.random_weights:
        raise UsageError(
            "--random-weights answers at chance: asap eval measures accuracy; time a shape with asap profile"
        )
    # The work's modules import torch: here, not at the top, so that `asap --help` starts in a blink.
    from .eval_run import EvalRun

    run = EvalRun.prepare(data, n, plot, attention_profile, log)

    loaded = where.load()
    with display.progress() as tasks:
        outcome = run.answer(
            loaded, where.model, grid, max_tokens=max_tokens, batch=batch, tasks=tasks, prompt_suffix=prompt_suffix
        )
    _report(outcome, output, run, log=log, files=[path for path in (plot, attention_profile) if path is not None])


def _report(outcome: Outcome, output: str, run: EvalRun, *, log: Path | None, files: list[Path]) -> None:
    """The table, then the files (or, interrupted, what was answered and exit 130)."""
    _print(outcome, output)  # before any file is written: a failed write loses only that file
    if outcome.interrupted:
        _interrupted(outcome, log, files)
    if outcome.log_error is not None:  # said first: a plot that fails on the same full disk ends the command
        display.error(f"cannot write {log}: {outcome.log_error}; it holds the answers before that")
    for path in run.write_files(outcome):
        display.note(f"wrote {path}")
    if outcome.log_error is not None:  # after the table and the other files: only the log's end is lost
        raise typer.Exit(1)


def _print(outcome: Outcome, output: str) -> None:
    if output == "json":
        display.print_json(outcome.report)
    elif output == "csv":
        display.print_csv([display.flat(dataclasses.asdict(row)) for row in outcome.report.results])
    elif output != "table":
        display.show(_table(outcome.report), output)
    elif outcome.report.results:
        _show(outcome)


def _interrupted(outcome: Outcome, log: Path | None, unwritten: list[Path]) -> None:
    """Say what an interrupted run answered and which files it did not write; exit 130 (Ctrl-C)."""
    holds = f"; {log} holds them" if log else ""
    skipped = f" Not written: {', '.join(str(path) for path in unwritten)}." if unwritten else ""
    display.note(f"Interrupted after {_count(outcome.answered, 'answer')}{holds}.{skipped}")
    raise typer.Exit(130)


def _has_regions(report) -> bool:
    return any(row.region_accuracy for row in report.results)


def _show(outcome: Outcome) -> None:
    """The table, what its columns mean and, when interrupted, how much of the run it covers."""
    report = outcome.report
    display.show(_table(report))
    from ..measure.questions import in_column_order  # PIL: after the run, not at the command's start

    kinds = in_column_order({kind for row in report.results for kind in row.accuracy})
    types = ", ".join(SHORT.get(kind, kind) for kind in kinds)
    display.out.print(
        "All figures in %. FLOPs: paper Eq. 8, visual tokens only (over all the questions); accuracy: "
        f"normalised exact match, greedy; avg: mean over question types ({types}); 95%: its 95% interval (each "
        "cell's in --json); rel: avg / vanilla's"
        + ("; top/bot: questions about one object in that half of the image." if _has_regions(report) else ".")
        + f" Answered on {report.environment.timed_on}.",
        markup=False,
        soft_wrap=True,
    )
    for rule in _k_rules(report):
        display.out.print(f"k: {rule}.", markup=False, soft_wrap=True)
    if report.partial:
        display.out.print(
            f"Partial: interrupted after {outcome.answered} of {outcome.asked} answers; each row scores the "
            "questions it answered.",
            markup=False,
            soft_wrap=True,
        )


def _k_rules(report: EvalReport) -> list[str]:
    """What k means for the methods of the table that keep another count than k (their k_rule)."""
    from ..engine.methods import METHODS

    names = dict.fromkeys(row.method for row in report.results if row.k is not None)
    return [rule for name in names if (rule := METHODS[name]().k_rule())]


def _table(report: EvalReport) -> display.Shown:
    """Table 1's layout: a row per method and budget; the FLOPs ratio, each question type's
    accuracy, the average with its interval, the average over vanilla's, in percent."""
    rows = report.results
    from ..measure.questions import in_column_order

    types = in_column_order({kind for row in rows for kind in row.accuracy})
    regions = [region for region in ("top", "bottom") if any(region in row.region_accuracy for row in rows)]
    headers = [SHORT.get(name, name) for name in (*types, "avg", "95%", "rel", *regions)]
    partial = " (partial)" if report.partial else ""
    compact = ", compact KV cache" if any(row.options.get("kv_cache") == "compact" for row in rows) else ""
    title = f"{report.model}: {report.data}, n={report.n}, L={report.layer}{compact}{partial}"
    table = display.Shown(title, ["method", "k", "FLOPs", *headers], keys=2)
    for row in rows:
        table.add_row(
            row.method,
            "-" if row.k is None else str(row.k),
            _percent(row.flops_ratio),
            *(_percent(row.accuracy.get(kind)) for kind in types),  # a partial row may lack some
            _percent(row.average),
            "-".join(_percent(bound) for bound in row.average_ci95),  # Wilson's: not symmetric near 0 and 100
            _percent(row.relative),
            *(_percent(row.region_accuracy.get(region)) for region in regions),
        )
    return table


SHORT = {"colour": "col", "exists": "exist", "position": "pos", "bottom": "bot"}  # 80 columns


def _percent(value: float | None) -> str:
    """A fraction as a percentage, the '%' in the caption."""
    return "-" if value is None else f"{value * 100:.1f}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
