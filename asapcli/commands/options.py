"""Options shared by the subcommands, so that every command spells them the same way."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from ..engine import METHODS
from ..errors import UsageError, ascii_digits
from ..presets import Preset
from ..settings import PruneSettings

DEFAULT_MODEL = "demo"  # bundled with the package: every command runs offline on a fresh machine

Model = Annotated[
    str,
    typer.Option(
        "-m",
        "--model",
        help="A preset name (see profiles/), a local model folder or a hub id. Default: demo, the bundled model.",
    ),
]
Method = Annotated[str, typer.Option("--method", help=f"Pruning method: {', '.join(METHODS)}.")]
K = Annotated[
    int | None,
    typer.Option("-k", "--k", help="Visual tokens kept per image. Default: the preset's, else 128."),
]
Layer = Annotated[
    int | None,
    typer.Option(
        "--layer", help="Prune after layer L-1: layers 0..L-1 see every token. Default: the preset's, else 2."
    ),
]
LambdaMax = Annotated[
    float | None, typer.Option("--lambda-max", help="asap: SG-BiMask's largest forward visibility, in (0, 1].")
]
MergeThreshold = Annotated[
    float | None,
    typer.Option("--merge-threshold", help="asap: cosine similarity above which kept tokens are merged."),
]
ScoreQueries = Annotated[
    str | None,
    typer.Option("--score-queries", help="asap: query rows that rank tokens: last, text or all."),
]
Score = Annotated[
    str | None,
    typer.Option(
        "--score",
        help="fastv, asap: rank by the attention a token receives (attention, default) or by attention "
        "times the norm of its value vector (contribution, CAPA).",
    ),
]
Positions = Annotated[
    str,
    typer.Option(
        "--positions",
        help="divprune, pool: kept tokens keep their own position ids (original, default) or are numbered "
        "0..M-1 as a shorter prompt (renumber: official DivPrune's pipeline).",
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[
    str, typer.Option("--dtype", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32.")
]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")]


def _finite(value: float) -> float:
    """inf and nan pass a range check (nan compares false with everything); neither samples text."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Temperature = Annotated[
    float, typer.Option("--temperature", min=0.0, callback=_finite, help="Sampling temperature; 0 is greedy.")
]
# torch seeds take 64 bits, and the random method multiplies the seed by a million: 32 bits fit.
Seed = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed for sampling and for the random method.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
Budgets = Annotated[
    str | None,
    typer.Option(
        "-k", "--k", help="Comma-separated budgets (visual tokens kept per image). Default: the preset's, else 128."
    ),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", min=1, max=1024, help="CPU threads for PyTorch (default: PyTorch's choice)."),
]


def method_list(text: str) -> list[str]:
    """Comma-separated method names, each one known."""
    names = _split(text, "--methods")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return names


def budget_list(text: str | None) -> list[int] | None:
    """Comma-separated budgets, each a whole number >= 1; None when not given."""
    if text is None:
        return None
    budgets = []
    for item in _split(text, "-k/--k"):
        if not ascii_digits(item) or int(item) < 1:
            raise UsageError(f"k must be a whole number of at least 1, got {item!r}")
        budgets.append(int(item))
    return budgets


def check_positions(methods: list[str], positions: str) -> None:
    """--positions renumber with several methods applies to those that prune before the language
    model; one of them at least must be in the list."""
    if positions == "renumber" and not any(METHODS[name].before_llm for name in methods):
        PruneSettings(method=methods[0], positions=positions).check()  # says which methods take it


def _split(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{option} is empty")
    return items


def prune_settings(preset: Preset | None = None, **given) -> PruneSettings:
    """PruneSettings from the options as given (None: not given). k and layer left out come
    from the model's preset; anything else left out takes PruneSettings' own default."""
    chosen = {"k": preset.k, "layer": preset.layer} if preset is not None else {}
    chosen.update({name: value for name, value in given.items() if value is not None})
    return PruneSettings(**chosen)
