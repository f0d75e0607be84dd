"""asap run IMAGE PROMPT: answer a question about an image, with pruning; several images or
prompts run as one padded batch."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..engine.settings import PruneSettings
from ..errors import UsageError
from ..report import display
from . import options

if TYPE_CHECKING:
    from .answering import Answered

ARGUMENTS_HELP = (
    "Image files (or a quoted glob), then the question ('-' reads it from stdin). With --prompt, all are images."
)
MORE_IMAGES_HELP = "Another image (repeatable; a quoted glob works)."
PROMPTS_HELP = "A question (repeatable): one per image, or each for the one image."
SAVE_KEPT_HELP = (
    "Write a figure of the tokens the method kept, each in the colour of its role, the dropped patches dimmed "
    "(.png, .svg, .pdf, .jpg or .webp; LLaVA-1.5 and LLaVA-NeXT style models)."
)


@options.command
def run(
    arguments: Annotated[list[str], typer.Argument(metavar="IMAGE... PROMPT", help=ARGUMENTS_HELP)],
    more_images: Annotated[
        list[str] | None, typer.Option("--image", "-i", metavar="FILE", help=MORE_IMAGES_HELP)
    ] = None,
    prompts: Annotated[list[str] | None, typer.Option("--prompt", "-p", metavar="TEXT", help=PROMPTS_HELP)] = None,
    *,
    where: options.Where,
    pruning: options.OneMethod,
    sampling: options.Sampling,
    save_kept: Annotated[Path | None, typer.Option("--save-kept", metavar="FILE", help=SAVE_KEPT_HELP)] = None,
    json: options.json_flag() = False,
) -> None:
    """Answer PROMPT about IMAGE, pruning visual tokens inside the language model.

    Several images (or prompts) run as one padded batch: each sample keeps its own k tokens.
    """
    settings = pruning.settings(where, sampling.seed)  # made and checked before anything heavy
    where.check([settings])
    # The user's files first, with light modules (PIL, no torch): a typo is refused in a blink.
    from ..report import figures
    from ..runtime.inputs import read_samples

    samples = read_samples(arguments, more_images or [], prompts or [], _read_stdin)
    if save_kept is not None:
        if len(samples.pairs) > 1:
            raise UsageError("--save-kept draws one image; run one sample to use it")
        figures.check_figure_writable(save_kept, inputs=[path for path, _ in samples.pairs])
    from . import answering  # imports torch and transformers: seconds of CPU

    loaded = where.load()
    settings = settings.for_model(loaded.num_layers)
    several = len(samples.pairs) > 1
    with display.progress() if several else nullcontext() as tasks:  # one sample alone streams its answer
        # a batch decodes all its samples together: its steps are tokens, at most --max-tokens
        step = tasks(f"Decoding {len(samples.pairs)} samples in one batch", sampling.max_tokens) if tasks else None
        answers = answering.answer(
            loaded, settings, samples, **sampling.generation, system=sampling.system,
            on_text=None if json or several else display.write, on_step=step, draws_kept=save_kept is not None,
        )  # fmt: skip
    _show(answers, settings, json, several)
    if save_kept is not None:  # after the answer is out: a failed write loses only the picture
        view = answering.kept_view(loaded, samples.pictures[answers[0].image], answers[0])
        figure = figures.draw_kept(samples.pictures[answers[0].image], view)
        figures.save_figure(figure, save_kept, inputs=[answers[0].image])
        display.note(f"wrote {save_kept}")


def _read_stdin() -> str:
    """The prompt piped in; bytes that are not text become lone surrogates, which check_prompt
    refuses with one error line."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:
        return sys.stdin.read().strip()
    return raw.read().decode(getattr(sys.stdin, "encoding", None) or "utf-8", "surrogateescape").strip()


def _show(answers: list[Answered], settings: PruneSettings, json: bool, several: bool) -> None:
    """One JSON object per sample; or the streamed answer and its summary line; or for a batch an
    answer line per sample (`IMAGE: answer`), then a summary line each."""
    if json:
        for answered in answers:
            display.print_json(answered.record)
        return
    if not several:
        display.write("\n")
        display.note(display.summary(settings, answers[0].result))
        return
    several_prompts = len({answered.prompt for answered in answers}) > 1
    labels = [f"{a.image} [{a.prompt}]" if several_prompts else str(a.image) for a in answers]
    for label, answered in zip(labels, answers, strict=True):
        display.write(f"{label}: {answered.result.text}\n")
    for label, answered in zip(labels, answers, strict=True):  # each summary names its sample as its answer does
        display.note(f"{label}: {display.summary(settings, answered.result)}")
