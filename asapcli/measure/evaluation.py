"""Accuracy under pruning: a question set run through methods and budgets (the paper's Table 1),
and the attention the scoring queries pay to each patch of the image (the attention shift, Fig. 2)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..demo import scenes
from ..engine import cost
from ..engine.methods import DEFAULT_METHOD, METHODS
from ..engine.plans import plan_for
from ..engine.session import PruningSession, attached
from ..engine.settings import MethodGrid, PruneSettings
from ..errors import AsapError
from ..records import Environment, EvalRow, LoggedAnswer
from ..runtime import patch_layout
from ..runtime.generation import context_length, generate_batch, to_device
from ..runtime.inputs import build_batch_inputs, check_text
from ..runtime.loading import Loaded
from . import questions
from .questions import Item

# LLaVA's evaluation prompt for short answers (its GQA, VQAv2 and TextVQA scripts); the demo
# model answers one word already, and its tokenizer knows none of these words.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


def default_prompt_suffix(loaded: Loaded) -> str:
    return "" if loaded.preset is not None and loaded.preset.bundled else SHORT_ANSWER_PROMPT


Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def wilson(hits: int, total: int) -> list[float]:
    """Wilson's 95% score interval of a proportion: unlike hits/total +- 1.96 sd, it does not
    shrink to nothing at 0% or 100%."""
    if total == 0:
        return [math.nan, math.nan]
    p, z2 = hits / total, Z95**2
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total**2)) / (1 + z2 / total)
    return [max(0.0, centre - half), min(1.0, centre + half)]


@dataclass
class Score:
    """Exact-match results of one method at one budget."""

    settings: PruneSettings
    flops: list[cost.VisualFlops] = field(default_factory=list)  # Eq. 7 of each answer's visual tokens
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    region_hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    region_totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, item: Item, correct: bool, flops: cost.VisualFlops) -> None:
        """One answer: whether it was right, and its visual tokens' Eq. 7."""
        self.flops.append(flops)
        self.hits[item.type] += correct
        self.totals[item.type] += 1
        if item.region is not None:
            self.region_hits[item.region] += correct
            self.region_totals[item.region] += 1

    @property
    def flops_ratio(self) -> float:
        """Eq. 8 over every question answered: each image keeps its own count of tokens
        (LLaVA-NeXT's tiles, an adaptive method)."""
        return cost.eq8(self.flops)

    def accuracy(self) -> dict[str, float]:
        return {kind: self.hits[kind] / self.totals[kind] for kind in questions.in_column_order(self.totals)}

    def region_accuracy(self) -> dict[str, float]:
        return {region: self.region_hits[region] / self.region_totals[region] for region in self.region_totals}

    @property
    def average(self) -> float:
        """The mean over question types, as Table 1 averages over benchmarks."""
        accuracy = self.accuracy()
        return sum(accuracy.values()) / len(accuracy) if accuracy else math.nan

    def row(self, vanilla: Score | None) -> EvalRow:
        """The score as a row of the table (and of --json), `relative` to vanilla's average."""
        return EvalRow(
            method=self.settings.method.name,
            k=self.settings.budget,
            options=self.settings.method.options(),
            flops_ratio=self.flops_ratio,
            accuracy=self.accuracy(),
            region_accuracy=self.region_accuracy(),
            average=self.average,
            relative=self.average / vanilla.average if vanilla and vanilla.average else None,
            questions=sum(self.totals.values()),
            accuracy_ci95={kind: wilson(self.hits[kind], self.totals[kind]) for kind in self.totals},
            average_ci95=self.average_interval(),
        )

    def average_interval(self) -> list[float]:
        """95% interval of the mean over question types, from each type's Wilson interval: the
        distances from each accuracy down and up to its bounds, combined as independent errors
        (root of the sum of squares) over the number of types; one type's is its Wilson interval.
        Unlike p(1-p)/n averaged, it does not shrink to nothing at 100% (8 of 8 read 100.0±0.0)."""
        accuracy = self.accuracy()
        if not accuracy:
            return [math.nan, math.nan]
        below = above = 0.0
        for kind, p in accuracy.items():
            low, high = wilson(self.hits[kind], self.totals[kind])
            below, above = below + (p - low) ** 2, above + (high - p) ** 2
        types = len(accuracy)
        return [max(0.0, self.average - math.sqrt(below) / types), min(1.0, self.average + math.sqrt(above) / types)]


def runs(grid: MethodGrid, num_layers: int) -> list[PruneSettings]:
    """Table 1's rows, in the grid's order (vanilla once, then budget by budget), each checked
    against the model's layers."""
    return [settings.for_model(num_layers) for settings in grid.runs()]


def check_questions(loaded: Loaded, items: list[Item], prompt_suffix: str = "") -> None:
    """Every question is one the model can be asked, checked before the first answer: its text,
    and the longest one's prompt (image tokens and template included) against the model's context,
    which a question found too long halfway through would have cut the run short at."""
    lengths = []
    for number, item in enumerate(items, start=1):
        try:
            check_text(loaded.processor, item.question)
        except AsapError as error:
            raise type(error)(f"question {number}: {error}") from None
        lengths.append(len(loaded.processor.tokenizer(item.question)["input_ids"]))
    longest = max(range(len(items)), key=lengths.__getitem__)
    item = items[longest]
    prompt = f"{item.question}\n{prompt_suffix}" if prompt_suffix else item.question
    tokens = int(build_batch_inputs(loaded.processor, [(prompt, item.picture())])["input_ids"].shape[1])
    if tokens >= context_length(loaded):
        raise AsapError(
            f"question {longest + 1}: its prompt is {tokens} tokens (image tokens included), the model's context "
            f"{context_length(loaded)}: no room for an answer; shorten it or leave it out"
        )


def correct(answer: str, expected: str | tuple[str, ...]) -> bool:
    """Normalised exact match with the expected answer, or with any of a list of accepted ones."""
    accepted = (expected,) if isinstance(expected, str) else expected
    return any(scenes.normalise(answer) == scenes.normalise(one) for one in accepted)


def evaluate(
    loaded: Loaded,
    items: list[Item],
    settings: list[PruneSettings],
    *,
    max_tokens: int = 10,
    batch_size: int = 1,
    on_step: Callable[[], None] | None = None,
    scores: list[Score] | None = None,
    on_answer: Callable[[Score, int, str, bool], None] | None = None,
    prompt_suffix: str = "",
) -> list[Score]:
    """Greedy answers to every item under every setting, scored by normalised exact match.
    `batch_size` items go through the model together, as one left-padded batch with a plan per
    row (each row answers as it would alone); a group's inputs are built once for all settings.
    `scores`, one per setting, are filled as answers come, so that an interrupted run still
    holds what was answered; `on_answer(score, item index, answer, correct)` sees each answer.
    `prompt_suffix` follows each question on a line of its own (LLaVA's short-answer prompt)."""
    scores = scores if scores is not None else [Score(setting) for setting in settings]
    for start in range(0, len(items), batch_size):
        group = items[start : start + batch_size]
        prompts = [f"{item.question}\n{prompt_suffix}" if prompt_suffix else item.question for item in group]
        inputs = build_batch_inputs(loaded.processor, list(zip(prompts, (item.picture() for item in group))))
        for score in scores:
            results = generate_batch(loaded, inputs, score.settings, max_tokens=max_tokens, seed=score.settings.seed)
            for index, (item, result) in enumerate(zip(group, results), start=start):
                hit = correct(result.text, item.answer)
                score.add(item, hit, result.flops)
                if on_answer is not None:
                    on_answer(score, index, result.text, hit)
                if on_step is not None:
                    on_step()
    return scores


class AnswerLog:
    """Every answer as one JSON line, written as it comes: an interrupted or failed run leaves a
    readable record of what it answered. A log that cannot be written (a full disk) stops logging,
    not the run: the file keeps its whole lines and `error` says why; the answers go on."""

    def __init__(self, path: Path, items: list[Item], environment: Environment):
        self.items, self.environment = items, environment
        self.path = path
        # Open, lock, then empty: a second eval writing the same log would interleave its lines.
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 -- open for the whole run; each line written at once
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise AsapError(f"{path} is being written by another run; give this one a log of its own") from None
        self.file.truncate(0)
        self.file.seek(0)  # where the next line goes, and what a failed one is cut back to
        self.lines = 0
        self.error: str | None = None

    def write(self, score: Score, index: int, answer: str, hit: bool) -> None:
        if self.error is not None:
            return
        item, settings = self.items[index], score.settings
        record = LoggedAnswer(
            method=settings.method.name,
            k=settings.budget,
            index=index,
            image=str(item.image) if isinstance(item.image, Path) else None,
            question=item.question,
            type=item.type,
            expected=item.answer,
            answer=answer,
            correct=hit,
            environment=self.environment,
        )
        line, whole = (json.dumps(asdict(record)) + "\n").encode("utf-8"), self.file.tell()
        try:
            if self.file.write(line) != len(line):
                raise OSError("no space left for a whole line")
            self.lines += 1
        except OSError as error:
            self.error = f"{error.strerror or error} after {self.lines} answers"
            with contextlib.suppress(OSError):
                self.file.truncate(whole)  # no line cut in the middle

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


@dataclass
class PatchAttention:
    """Mean attention the scoring queries (`queries`: last, text or all) pay to each patch of the
    image grid at layer L-1 (rows x cols, row 0 at the top), under the causal mask (what FastV
    ranks by) and under SG-BiMask (what ASAP ranks by). `layer` is L as the user gave it."""

    layer: int
    queries: str
    causal: list[list[float]]
    sg_bimask: list[list[float]]

    @staticmethod
    def per_row(grid: list[list[float]]) -> list[float]:
        return [sum(row) for row in grid]


def patch_attention(
    loaded: Loaded,
    items: list[Item],
    *,
    layer: int,
    lambda_max: float | None = None,
    queries: str | None = None,
    on_step: Callable[[], None] | None = None,
) -> PatchAttention:
    """Scores every item's image at layer `layer`-1 without pruning anything (a score-only plan)
    and averages the attention per patch of its first grid (LLaVA-NeXT: the base image, the same
    size for every image). The default method (ASAP) scores under SG-BiMask, the method it is
    paired with (FastV) under the causal mask."""
    shifted = METHODS[DEFAULT_METHOD]
    queries = queries or shifted.score_queries
    base = PruneSettings(shifted.name, layer=layer, score_queries=queries, lambda_max=lambda_max)
    # Each keeps the options it takes; checked against the model once, its budget set per image.
    masks = {
        "causal": base.for_method(shifted.paired_with).for_model(loaded.num_layers),
        "sg_bimask": base.for_model(loaded.num_layers),
    }
    sums = {mask: torch.zeros(()) for mask in masks}
    for item in items:
        picture = item.picture()
        inputs = build_batch_inputs(loaded.processor, [(item.question, picture)])
        everything = inputs["input_ids"].shape[1]
        for mask, settings in masks.items():
            plan = plan_for(loaded, inputs["input_ids"][0], settings.with_budget(everything), score_only=True)
            session = PruningSession(settings, loaded.text_config)
            with torch.inference_mode(), attached(loaded.model, session):
                session.plan_next(plan)
                loaded.model(**to_device(loaded, inputs))
            sums[mask] = sums[mask] + _on_grid(loaded, picture, session.prefills[0].records[0][0].importance)
            if on_step is not None:
                on_step()
    return PatchAttention(layer, queries, *((sums[mask] / len(items)).tolist() for mask in masks))


def _on_grid(loaded: Loaded, picture: Image.Image, importance: torch.Tensor) -> torch.Tensor:
    """The attention of one span's tokens laid on its first patch grid (rows, cols)."""
    grid = patch_layout.span_layout(loaded.processor, picture.size, importance.numel()).grids[0]
    index = torch.tensor([[grid.index(r, c) for c in range(grid.cols)] for r in range(grid.rows)])
    return importance.float().cpu()[index]
