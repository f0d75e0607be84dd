"""asap compare IMAGE PROMPT: one image and question under several methods, side by side: what
each kept and what each answered (the layout of the paper's Fig. 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..report import display
from . import options

OUT_HELP = (
    "Write the figure: the original image, then each method's kept tokens with its answer under it "
    "(.png, .svg, .pdf, .jpg or .webp)."
)


@dataclasses.dataclass
class Methods(options.Comparison):
    methods: options.Methods = options.SIDE_BY_SIDE


@options.command
def compare(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image.")],
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The question asked about it.")],
    *,
    where: options.Where,
    comparison: Methods,
    max_tokens: options.MaxTokens = 32,
    out: Annotated[Path | None, typer.Option("--out", "-o", metavar="FILE", help=OUT_HELP)] = None,
    json: options.json_flag("one JSON object (a CompareReport) instead of text") = False,
) -> None:
    """Answer PROMPT about IMAGE unpruned and under each method; print the answers and draw what each kept."""
    from ..report import figures
    from ..runtime.inputs import read_samples
    from .run import _read_stdin

    grid = comparison.grid(where, reference=True)  # made and checked before the long load
    where.check(grid.runs())
    samples = read_samples([str(image), prompt], [], [], _read_stdin)
    if out is not None:
        figures.check_figure_writable(out, inputs=[image])
    from ..records import CompareReport
    from . import answering  # imports torch and transformers: after the user's files are checked

    loaded = where.load()
    runs = [settings.for_model(loaded.num_layers) for settings in grid.runs()]
    with display.progress() as tasks:
        step = tasks("Answers", len(runs))
        answers = answering.compare(loaded, runs, samples, max_tokens=max_tokens, seed=comparison.seed, on_answer=step)
    if json:
        figure = None if out is None else str(out)
        display.print_json(
            CompareReport(
                loaded.name, str(image), answers[0].prompt, figure, [a.record for a in answers], loaded.environment
            )
        )
    else:
        for answered in answers:
            display.write(answering.comparison_line(answered) + "\n")
    if out is not None:  # after the answers are out: a failed write loses only the figure
        figures.save_figure(answering.comparison_figure(loaded, samples, answers), out, inputs=[image])
        display.note(f"wrote {out}")
