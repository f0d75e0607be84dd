"""Options shared by the subcommands, so that every command spells them the same way."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from ..generation import PruneSettings
from ..presets import Preset, preset_names

Model = Annotated[
    str | None,
    typer.Option("-m", "--model", help="A preset name (see profiles/), a local model folder or a hub id."),
]
Method = Annotated[str, typer.Option("--method", help="Pruning method: vanilla, fastv, random or asap.")]
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
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[
    str, typer.Option("--dtype", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32.")
]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for sampling and for the random method.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]


def require_model(model: str | None) -> str:
    """-m/--model is required until a bundled default model exists."""
    if model is None:
        raise UsageError(
            f"no model given: pass -m/--model with a preset ({', '.join(preset_names())}), a folder or a hub id"
        )
    return model


def prune_settings(
    method: str,
    k: int | None,
    layer: int | None,
    lambda_max: float | None,
    merge_threshold: float | None,
    score_queries: str | None,
    seed: int,
    preset: Preset | None = None,
) -> PruneSettings:
    """The pruning options as given; k and layer left out come from the model's preset, else
    from PruneSettings' own defaults."""
    chosen = {"k": preset.k, "layer": preset.layer} if preset is not None else {}
    chosen.update({name: value for name, value in (("k", k), ("layer", layer)) if value is not None})
    return PruneSettings(
        method=method,
        lambda_max=lambda_max,
        merge_threshold=merge_threshold,
        score_queries=score_queries,
        seed=seed,
        **chosen,
    )
