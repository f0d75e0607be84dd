"""asap flops: theoretical FLOPs of a pruning schedule (paper Eq. 7-8), no weights needed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .. import display, flops
from ..errors import UsageError
from ..loading import load_architecture
from . import options


def flops_command(
    model: options.Model = None,
    k: options.K = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Prune after layer L-1; 0 prunes before the first layer.")
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule", help="Several pruning steps LAYER:TOKENS,..., e.g. 2:960,16:480 (instead of -k/--layer)."
        ),
    ] = None,
    visual_tokens: Annotated[
        int | None, typer.Option("--visual-tokens", min=1, help="Visual tokens before pruning (default: the model's).")
    ] = None,
    gqa: Annotated[bool, typer.Option("--gqa", help="Count k/v projections at their grouped-query size.")] = False,
    json: options.Json = False,
) -> None:
    """Theoretical FLOPs of the visual tokens, vanilla and pruned (paper Eq. 7-8)."""
    model = options.require_model(model)
    if schedule is not None and (k is not None or layer is not None):
        raise UsageError("give either --schedule or -k/--layer, not both")
    if k is not None and k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    arch = load_architecture(model, visual_tokens)
    steps = flops.parse_schedule(schedule) if schedule else [(2 if layer is None else layer, 128 if k is None else k)]
    steps = [(step, min(tokens, arch.visual_tokens)) for step, tokens in steps]
    stages = flops.pruning_schedule(arch.layers, arch.visual_tokens, steps)
    kv_fraction = arch.kv_heads / arch.heads if gqa else 1.0
    count = lambda stage_list: flops.schedule_flops(stage_list, arch.hidden, arch.intermediate, kv_fraction)
    vanilla = count([flops.Stage(arch.layers, arch.visual_tokens)])
    pruned = count(stages)
    convention = flops.GQA_CONVENTION if gqa else flops.CONVENTION

    if json:
        display.print_json(
            {
                "model": model,
                "tflops_vanilla": vanilla / 1e12,
                "tflops": pruned / 1e12,
                "ratio": pruned / vanilla,
                "stages": [{"layers": s.layers, "tokens": s.tokens, "tflops": count([s]) / 1e12} for s in stages],
                "architecture": arch.__dict__,
                "convention": convention,
            }
        )
        return
    table = Table(title=f"{model}: FLOPs of the visual tokens", title_justify="left")
    for column in ("stage", "layers", "visual tokens", "TFLOPs"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    start = 0
    for index, stage in enumerate(stages):
        span = f"{start}..{start + stage.layers - 1}"
        table.add_row(str(index), span, str(stage.tokens), f"{count([stage]) / 1e12:.3f}")
        start += stage.layers
    table.add_section()
    table.add_row("vanilla", f"0..{arch.layers - 1}", str(arch.visual_tokens), f"{vanilla / 1e12:.3f}")
    table.add_row("pruned", "", "", f"{pruned / 1e12:.3f}")
    table.add_row("ratio", "", "", f"{pruned / vanilla:.2%}")
    display.out.print(table)
    display.out.print(f"Convention: {convention}.", markup=False, soft_wrap=True)
