"""asap eval: accuracy per method and budget on a question set (the layout of the paper's
Table 1), optionally plotted, and the attention shift made visible."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import display, evaluation, figures
from ..engine import METHODS
from ..errors import UsageError
from . import options


@options.command
def eval_command(
    *,
    where: options.Where,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help='JSONL of {"image": path, "question": str, "answer": str} (optional "type"), images relative '
            "to the file. Default: the demo model's held-out synthetic scenes.",
        ),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", min=1, help="Questions to ask (default: 200, or all of --data).")
    ] = None,
    methods: Annotated[
        str, typer.Option("--methods", help=f"Comma-separated methods, from {', '.join(METHODS)}.")
    ] = "vanilla,fastv,random,asap",
    budgets: options.Budgets = None,
    layer: options.Layer = None,
    hyperparameters: options.MethodOptions,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per answer.")] = 10,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=1,
            help="Questions answered together in one padded batch: the same answers; faster where the device "
            "has room to spare (a GPU), not on a busy CPU.",
        ),
    ] = 1,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of accuracy against FLOPs ratio, one line per method.")
    ] = None,
    attention_profile: Annotated[
        Path | None,
        typer.Option(
            "--attention-profile",
            help="Also write a PNG of the mean attention the last prompt token pays to each image row at layer "
            "L-1, causal vs SG-BiMask (two more passes over the questions).",
        ),
    ] = None,
    log: Annotated[
        Path | None,
        typer.Option(
            "--log",
            help="Write every answer as a JSON line (method, k, question, expected, answer, correct) as it "
            "comes: an interrupted run leaves what it answered.",
        ),
    ] = None,
    threads: options.Threads = None,
    seed: options.Seed = 0,
    json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with every row instead of a table.")
    ] = False,
) -> None:
    """Accuracy of each method at each budget: per question type, average, relative to vanilla."""
    names = options.method_list(methods)
    options.prune_settings(names, hyperparameters)  # fail before the long load
    ks = options.budget_list(budgets)
    items = evaluation.read_items(data, n) if data is not None else evaluation.synthetic_items(n or 200)
    outputs = [path for path in (plot, attention_profile, log) if path is not None]
    if len({path.expanduser().resolve() for path in outputs}) < len(outputs):
        raise UsageError("--plot, --attention-profile and --log must name different files")
    inputs = ([data] if data is not None else []) + [item.image for item in items if isinstance(item.image, Path)]
    for path in outputs:
        figures.check_writable(path, inputs)
    if threads is not None:
        torch.set_num_threads(threads)

    loaded = where.load()
    evaluation.check_questions(loaded, items)
    base = options.prune_settings(names, hyperparameters, loaded.preset, layer=layer, seed=seed)
    if ks is None:
        ks = list(loaded.preset.budgets) if loaded.preset and loaded.preset.budgets else [base.k]
    runs = evaluation.runs(names, ks, base)
    for settings in runs:
        settings.check(loaded.num_layers)

    scores = [evaluation.Score(settings) for settings in runs]
    rows, interrupted = None, False
    answers = evaluation.AnswerLog(log, items) if log is not None else None
    try:
        with _progress() as progress:
            task = progress.add_task("Answering", total=len(items) * len(runs))
            evaluation.evaluate(
                loaded,
                items,
                runs,
                max_tokens,
                batch,
                on_step=lambda: progress.advance(task),
                scores=scores,
                on_answer=answers.write if answers is not None else None,
            )
            if attention_profile is not None:
                task = progress.add_task("Attention profile", total=2 * len(items))
                rows = evaluation.row_attention(
                    loaded, items, base.layer, hyperparameters.get("lambda_max"), on_step=lambda: progress.advance(task)
                )
    except KeyboardInterrupt:  # Ctrl-C: show what was answered, marked partial, then exit 130
        interrupted = True
    finally:
        if answers is not None:
            answers.close()

    # The results are shown before any file is written: a failed write loses only that file.
    answered = sum(sum(score.totals.values()) for score in scores)
    scores = [score for score in scores if score.totals]
    vanilla = next((score for score in scores if score.settings.method == "vanilla"), None)
    source = str(data) if data is not None else "synthetic held-out scenes"
    partial = " (partial)" if interrupted else ""
    if json:
        display.print_json(
            {
                "model": where.model,
                "data": source,
                "n": len(items),
                "layer": base.layer,
                "partial": interrupted,
                "results": [_record(score, vanilla) for score in scores],
                "attention_profile": None if rows is None else {"causal": rows.causal, "sg_bimask": rows.sg_bimask},
            }
        )
    elif scores:
        display.out.print(_table(scores, vanilla, f"{where.model}: {source}, n={len(items)}, L={base.layer}{partial}"))
        display.out.print(
            "FLOPs %: paper Eq. 8, visual tokens only; accuracy: normalised exact match, greedy; avg: mean over "
            "question types; rel: avg / vanilla's; top/bottom: questions about one object in that half of the "
            "image.",
            markup=False,
            soft_wrap=True,
        )
        if interrupted:
            display.out.print(
                f"Partial: interrupted after {answered} of {len(items) * len(runs)} answers; each row scores the "
                "questions it answered.",
                markup=False,
                soft_wrap=True,
            )
    if interrupted:
        display.note(f"Interrupted after {answered} answers{'; ' + str(log) + ' holds them' if log else ''}.")
        raise typer.Exit(130)
    if log is not None:
        display.note(f"wrote {log}")
    if plot is not None:
        figures.save_png(
            figures.accuracy_plot(_series(scores), f"{where.model}: {source}, n={len(items)}"), plot, inputs
        )
        display.note(f"wrote {plot}")
    if rows is not None:
        title = f"{where.model}: attention of the last prompt token per image row, layer {rows.layer - 1}"
        curves = {"causal (FastV)": rows.causal, "SG-BiMask (ASAP)": rows.sg_bimask}
        figures.save_png(figures.row_attention_plot(curves, title), attention_profile, inputs)
        display.note(f"wrote {attention_profile}")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=display.err,
        transient=True,
        disable=not display.err.is_terminal,
    )


def _series(scores: list[evaluation.Score]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for score in scores:
        series.setdefault(score.settings.method, []).append((100 * score.flops_ratio, 100 * score.average))
    return series


def _record(score: evaluation.Score, vanilla: evaluation.Score | None) -> dict:
    return {
        "method": score.settings.method,
        "k": None if score.settings.method == "vanilla" else score.settings.k,
        "flops_ratio": score.flops_ratio,
        "accuracy": score.accuracy(),
        "region_accuracy": score.region_accuracy(),
        "average": score.average,
        "relative": score.average / vanilla.average if vanilla and vanilla.average else None,
        "questions": sum(score.totals.values()),
    }


def _table(scores: list[evaluation.Score], vanilla: evaluation.Score | None, title: str) -> Table:
    types = list(dict.fromkeys(kind for score in scores for kind in score.totals))
    regions = [region for region in ("top", "bottom") if any(region in score.region_totals for score in scores)]
    table = Table(title=title, title_justify="left")
    for column in ["method", "k", "FLOPs %", *types, "avg", "rel", *regions]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for score in scores:
        record = _record(score, vanilla)
        table.add_row(
            score.settings.method,
            "-" if record["k"] is None else str(record["k"]),
            f"{score.flops_ratio:.1%}",
            *(_percent(record["accuracy"].get(kind)) for kind in types),  # a partial row may lack some
            f"{score.average:.1%}",
            _percent(record["relative"]),
            *(_percent(record["region_accuracy"].get(region)) for region in regions),
        )
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
