"""The pruning methods' hyperparameters, each declared once: its name (the field of every method
that takes it, the key in PruneSettings, `--name-with-dashes` on the command line), its type, what
it means and which values it takes. A method takes a hyperparameter by having a dataclass field
of that name; nothing else lists them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    type: type
    help: str
    choices: tuple[str, ...] = ()
    valid: Callable[[object], bool] | None = None  # for values without choices
    rule: str = ""  # what `valid` asks, in words: "must be in (0, 1]"
    # A refusal worded for this option (e.g. which kind of method takes it); {method} is the
    # method that does not, {takers} those that do.
    refusal: str = ""
    # The value every method that does not take it behaves as, where there is one: giving it
    # to such a method says what the method does anyway, and is not refused.
    implied: object = None
    # What the help says the default is where the field's default (None) stands for a rule.
    default_rule: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value) -> str | None:
        """Why `value` is not one this hyperparameter takes; None when it is."""
        if self.type is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"{self.flag[2:]} needs a number, got {value!r}"
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{self.flag[2:]} needs a whole number, got {value!r}"
        if self.type is bool and not isinstance(value, bool):
            return f"{self.flag[2:]} is a switch (true or false), got {value!r}"
        if self.choices and value not in self.choices:
            return f"{self.flag[2:]} must be one of {', '.join(self.choices)}, got {value!r}"
        if self.valid is not None and not self.valid(value):
            return f"{self.flag[2:]} {self.rule}, got {value!r}"
        return None

    def parse(self, value):
        """`value` as this hyperparameter's type (a whole number where a float is asked for is
        one), once `problem` found none."""
        return float(value) if self.type is float else value


def _finite_in(low: float, high: float, low_open: bool) -> Callable[[object], bool]:
    def valid(value) -> bool:
        return math.isfinite(value) and (low < value if low_open else low <= value) and value <= high

    return valid


def _ratio_or_budget(value) -> bool:
    if value == "budget":
        return True
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(ratio) and 0 < ratio < 1


SCORE_QUERIES = ("last", "text", "all")
SCORES = ("attention", "contribution")
POSITIONS = ("original", "renumber")
STAGE_COUNTS = ("budget", "table")
KV_CACHES = ("exact", "compact")

HYPERPARAMETERS: dict[str, Hyperparameter] = {
    h.name: h
    for h in (
        Hyperparameter(
            "lambda_max",
            float,
            "SG-BiMask's largest forward visibility, in (0, 1].",
            valid=_finite_in(0, 1, low_open=True),
            rule="must be in (0, 1]",
        ),
        Hyperparameter(
            "merge_threshold",
            float,
            "cosine similarity above which kept tokens are merged.",
            valid=_finite_in(-1, 1, low_open=False),
            rule="is a cosine similarity in [-1, 1]",
        ),
        Hyperparameter(
            "score_queries",
            str,
            "query rows that rank tokens: last, text or all.",
            choices=SCORE_QUERIES,
        ),
        Hyperparameter(
            "score",
            str,
            "rank by the attention a token receives (attention, default) or by attention times the norm of "
            "its value vector (contribution, CAPA).",
            choices=SCORES,
        ),
        Hyperparameter(
            "important_ratio",
            float,
            "VisPruner's share of the budget kept for the [CLS] token's attention, in [0, 1] (default 0.5); "
            "the rest is kept for diversity.",
            valid=_finite_in(0, 1, low_open=False),
            rule="must be in [0, 1]",
        ),
        Hyperparameter(
            "positions",
            str,
            "kept tokens keep their own position ids (original, default) or are numbered 0..M-1 as a shorter "
            "prompt (renumber: official DivPrune's, VisPruner's, VisionZip's, PruMerge+'s, PyramidDrop's and "
            "SparseVLM's pipelines).",
            choices=POSITIONS,
            refusal="--positions {value} is for methods that shorten the sequence they feed on ({takers}); "
            "{method} keeps original positions",
            implied="original",
        ),
        Hyperparameter(
            "contextual",
            int,
            "VisionZip's contextual (merged) tokens among the k, from 1 to k - 1; the rest are the [CLS] token and "
            "the patches it attends to most. On LLaVA-NeXT, per tile: among each tile's k // 5.",
            valid=lambda value: value >= 1,
            rule="must be at least 1",
            default_rule="10 per 64 of k, rounded half up (54 + 10 at k = 64, 108 + 20, 162 + 30)",
        ),
        Hyperparameter(
            "adaptive",
            bool,
            "PruMerge+'s own adaptive count (the share of [CLS] attention outliers, IQR), whatever k below the "
            "image's tokens; without it, exactly k tokens (half most attended, half spatial samples, one extra "
            "token; on LLaVA-NeXT k // 5 per tile).",
        ),
        Hyperparameter(
            "stage_ratio",
            str,
            "the share lambda of the image tokens each stage keeps: budget (matched to -k, default) or a number "
            "in (0, 1) (0.5: the authors' scripts).",
            valid=_ratio_or_budget,
            rule="must be budget or a number in (0, 1)",
        ),
        Hyperparameter(
            "stage_counts",
            str,
            "the image tokens each stage keeps: budget (matched to -k, default) or table (the authors' counts "
            "for -k 64, 128, 192).",
            choices=STAGE_COUNTS,
        ),
        Hyperparameter(
            "kv_cache",
            str,
            "what the KV cache of the layers before the (first) pruning step keeps once the prefill is done: every "
            "token they saw (exact, default: decoding attends there as the prefill did) or only the tokens that "
            "step kept (compact: every layer holds the kept tokens alone, as the paper's Table 4 counts).",
            choices=KV_CACHES,
            refusal="--kv-cache {value} is for methods that prune inside the language model ({takers}): {method} "
            "leaves no layer's cache to compact (one that prunes before the language model holds only its kept "
            "tokens in every layer already; vanilla prunes nothing)",
            implied="exact",
        ),
    )
}


def in_keywords(message: str) -> str:
    """A refusal worded with the CLI's flags (--merge-threshold) in the keywords a caller of the
    API or lmms-eval's model_args writes (merge_threshold)."""
    import re

    for name, hyperparameter in HYPERPARAMETERS.items():
        message = re.sub(rf"(?<![\w-])(--)?{re.escape(hyperparameter.flag[2:])}\b", name, message)
    return message
