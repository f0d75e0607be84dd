"""One `asap eval`: its questions and output files checked before the model loads; every method
at every budget answering them (Ctrl-C keeps what was answered, marked partial); the report
(records.EvalReport); the files written after the results are shown."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..measure import questions
from ..measure.questions import Item
from ..records import AttentionProfile, EvalReport
from ..report import figures

if TYPE_CHECKING:  # the answering's modules import torch: at answer(), after the files are checked
    from ..engine.settings import MethodGrid
    from ..measure.evaluation import PatchAttention
    from ..runtime.loading import Loaded

# add(what, total) starts a progress bar and returns the function that advances it
Tasks = Callable[[str, int], Callable[[], None]]


@dataclass(frozen=True)
class Outcome:
    report: EvalReport
    answered: int  # answers given, over every method and budget
    asked: int  # answers a whole run gives
    attention: PatchAttention | None  # the attention profile, when asked for and not interrupted
    log_error: str | None = None  # why --log stopped being written (a full disk), the run going on

    @property
    def interrupted(self) -> bool:
        return self.report.partial


@dataclass(frozen=True)
class EvalRun:
    items: list[Item]
    source: str  # what the questions are, as the report names them
    plot: Path | None
    attention_profile: Path | None
    log: Path | None
    inputs: list[Path]  # files the run reads, which no output may overwrite

    @classmethod
    def prepare(
        cls, data: Path | None, n: int | None, plot: Path | None, attention_profile: Path | None, log: Path | None
    ) -> EvalRun:
        """The questions (--data, else `n` synthetic ones, 200 by default) read and checked, and
        the output files checked writable and distinct."""
        items = questions.read_items(data, n) if data is not None else questions.synthetic_items(n or 200)
        outputs = [path for path in (plot, attention_profile, log) if path is not None]
        if len({path.expanduser().resolve() for path in outputs}) < len(outputs):
            raise UsageError("--plot, --attention-profile and --log must name different files")
        inputs = ([data] if data is not None else []) + [item.image for item in items if isinstance(item.image, Path)]
        for path in (plot, attention_profile):
            if path is not None:
                figures.check_figure_writable(path, inputs)
        if log is not None:
            figures.check_writable(log, inputs)
        source = str(data) if data is not None else "synthetic held-out scenes"
        return cls(items, source, plot, attention_profile, log, inputs)

    def answer(
        self,
        loaded: Loaded,
        model: str,
        grid: MethodGrid,
        *,
        max_tokens: int = 10,
        batch: int = 1,
        tasks: Tasks | None = None,
        prompt_suffix: str | None = None,
    ) -> Outcome:
        """Every method at every budget of `grid` over the questions, then the attention profile
        if asked for (with the grid's --lambda-max and --score-queries). Ctrl-C stops it and
        keeps what was answered; --log's file holds every answer given."""
        from ..measure import evaluation
        from ..measure.evaluation import AnswerLog, Score

        items, tasks = self.items, tasks or (lambda description, total: lambda: None)
        suffix = evaluation.default_prompt_suffix(loaded) if prompt_suffix is None else prompt_suffix
        evaluation.check_questions(loaded, items, suffix)
        runs = evaluation.runs(grid, loaded.num_layers)
        scores = [Score(settings) for settings in runs]
        attention, interrupted = None, False
        answers = AnswerLog(self.log, items, loaded.environment) if self.log is not None else None
        try:
            on_answer = answers.write if answers is not None else None
            step = tasks("Answers", len(items) * len(runs))  # questions x runs: what the count counts
            evaluation.evaluate(
                loaded, items, runs, max_tokens=max_tokens, batch_size=batch, on_step=step, scores=scores,
                on_answer=on_answer, prompt_suffix=suffix,
            )  # fmt: skip
            if self.attention_profile is not None:
                attention = self._attention(loaded, grid, tasks("Attention profile", 2 * len(items)))
        except KeyboardInterrupt:  # Ctrl-C: what was answered, marked partial
            interrupted = True
            _ignore_more_presses()
        finally:
            if answers is not None:
                answers.close()
        answered = sum(sum(score.totals.values()) for score in scores)
        scores = [score for score in scores if score.totals]
        vanilla = next((score for score in scores if not score.settings.method.prunes), None)
        report = EvalReport(
            model=model, data=self.source, n=len(items), layer=grid.layer, partial=interrupted,
            results=[score.row(vanilla) for score in scores],
            attention_profile=None if attention is None else _profile(attention), environment=loaded.environment,
        )  # fmt: skip
        log_error = answers.error if answers is not None else None
        return Outcome(report, answered, len(items) * len(runs), attention, log_error)

    def _attention(self, loaded: Loaded, grid: MethodGrid, step: Callable[[], None]) -> PatchAttention:
        """The attention profile at the grid's L, with its --lambda-max and --score-queries."""
        lambda_max, queries = grid.options.get("lambda_max"), grid.options.get("score_queries")
        from ..measure import evaluation

        return evaluation.patch_attention(
            loaded, self.items, layer=grid.layer, lambda_max=lambda_max, queries=queries, on_step=step
        )

    def write_files(self, outcome: Outcome) -> Iterator[Path]:
        """The output files, each yielded once written (--log's was written as answers came)."""
        report = outcome.report
        if self.log is not None and outcome.log_error is None:
            yield self.log
        if self.plot is not None:
            title = f"{report.model}: {report.data}, n={report.n}, L={report.layer}"
            figure = figures.draw_accuracy(figures.accuracy_points(report.results), title)
            figures.save_figure(figure, self.plot, self.inputs)
            yield self.plot
        if outcome.attention is not None:
            attention = outcome.attention
            title = figures.attention_title(report.model, attention.layer, attention.queries, report.n)
            view = figures.AttentionView(title, attention.causal, attention.sg_bimask)
            figures.save_figure(figures.draw_attention(view), self.attention_profile, self.inputs)
            yield self.attention_profile


def _profile(attention: PatchAttention) -> AttentionProfile:
    per_row = type(attention).per_row
    return AttentionProfile(
        attention.queries,
        per_row(attention.causal),
        per_row(attention.sg_bimask),
        attention.causal,
        attention.sg_bimask,
    )


def _ignore_more_presses() -> None:
    """After the Ctrl-C that ended the answering, more presses in a row (an impatient user) must
    not cut the partial table mid-print, nor the interpreter's exit after it: the command ends
    its process right after."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
