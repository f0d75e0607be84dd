"""asap flops: theoretical FLOPs of a pruning schedule (paper Eq. 7-8), no weights needed; with
--measure, fvcore's count of a real forward beside them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .. import display, flops
from ..engine import METHODS
from ..errors import UsageError
from ..loading import load_architecture
from ..presets import find_preset
from ..settings import PruneSettings
from . import options


@options.command
def flops_command(
    *,
    where: options.Where,
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
    measure: Annotated[
        bool,
        typer.Option(
            "--measure", help="Also count a real forward of the model's language model with fvcore (loads the model)."
        ),
    ] = False,
    method: Annotated[str, typer.Option("--method", help="With --measure: the method that prunes.")] = "asap",
    json: options.Json = False,
) -> None:
    """Theoretical FLOPs of the visual tokens, vanilla and pruned (paper Eq. 7-8)."""
    if schedule is not None and (k is not None or layer is not None):
        raise UsageError("give either --schedule or -k/--layer, not both")
    if k is not None and k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model = where.model
    arch = load_architecture(model, visual_tokens)
    if schedule is not None:
        steps = flops.parse_schedule(schedule)
    else:
        k_or_preset, layer_or_preset = options.budget_and_layer(find_preset(model), k, layer)
        # divprune and pool prune before the first layer, whatever --layer says (as asap run does)
        steps = [(0 if measure and METHODS[method].before_llm else layer_or_preset, k_or_preset)]
    if schedule is None and k is None and steps[0][1] >= arch.visual_tokens:
        stages = [flops.Stage(arch.layers, arch.visual_tokens)]  # the preset's k keeps them all
    else:
        stages = flops.pruning_schedule(arch.layers, arch.visual_tokens, steps)
    # fvcore counts what the model computes: grouped-query k/v projections at their real size.
    kv_fraction = arch.kv_heads / arch.heads if gqa or measure else 1.0

    def count(stage_list: list[flops.Stage]) -> float:
        return flops.schedule_flops(stage_list, arch.hidden, arch.intermediate, kv_fraction)

    vanilla, pruned = count([flops.Stage(arch.layers, arch.visual_tokens)]), count(stages)
    convention = flops.GQA_CONVENTION if kv_fraction != 1.0 else flops.CONVENTION
    counted = _measure(where, arch.visual_tokens, steps, method) if measure else None

    if json:
        record = {
            "model": model,
            "tflops_vanilla": vanilla / 1e12,
            "tflops": pruned / 1e12,
            "ratio": pruned / vanilla,
            "stages": [{"layers": s.layers, "tokens": s.tokens, "tflops": count([s]) / 1e12} for s in stages],
            "architecture": arch.__dict__,
            "convention": convention,
        }
        if counted is not None:
            record["measured"] = {
                "tflops_vanilla": counted["vanilla"].total / 1e12,
                "tflops": counted["pruned"].total / 1e12,
                "stages_tflops": [sum(layers) / 1e12 for layers in _by_stage(counted["pruned"].per_layer, stages)],
                "method": method,
                "method_ops_tflops": {op: n / 1e12 for op, n in counted["pruned"].other.items()},
                "counter": "fvcore (multiply-accumulates) with a scaled_dot_product_attention handle",
            }
        display.print_json(record)
        return
    display.out.print(_table(model, arch, stages, count, counted))
    display.out.print(f"Convention: {convention}.", markup=False, soft_wrap=True)
    if counted is not None:
        extra = ", ".join(f"{op} {n:,} FLOPs" for op, n in counted["pruned"].other.items()) or "none"
        display.out.print(
            f"Measured: fvcore's count of the language model run on {arch.visual_tokens} visual tokens "
            f"(linear layers and attention), pruned by {method}; the method's own scoring ops, counted "
            f"apart: {extra}.",
            markup=False,
            soft_wrap=True,
        )


def _measure(where: options.Where, visual_tokens: int, steps, method: str):
    """fvcore's counts, vanilla and pruned, of the loaded model's language model."""
    from ..flops.measured import count_flops  # fvcore and the model load only when asked for

    if len(steps) != 1:
        raise UsageError("--measure runs one pruning step: give -k/--layer, not a --schedule of several")
    ((layer, k),) = steps
    # A method that prunes before the LLM ignores L; check() asks for one all the same.
    settings = PruneSettings(method=method, k=k, layer=max(layer, 1) if METHODS[method].before_llm else layer)
    settings.check()
    loaded = where.load()
    settings.check(loaded.num_layers)
    with display.status("Counting FLOPs with fvcore"):
        return {"vanilla": count_flops(loaded, visual_tokens), "pruned": count_flops(loaded, visual_tokens, settings)}


def _by_stage(per_layer: list[int], stages: list[flops.Stage]) -> list[list[int]]:
    groups, start = [], 0
    for stage in stages:
        groups.append(per_layer[start : start + stage.layers])
        start += stage.layers
    return groups


def _table(model, arch, stages, count, counted) -> Table:
    vanilla, pruned = count([flops.Stage(arch.layers, arch.visual_tokens)]), count(stages)
    unit, scale = display.flop_unit(vanilla)
    table = Table(title=f"{model}: FLOPs of the visual tokens", title_justify="left")
    columns = ["stage", "layers", "visual tokens", unit] + ([f"measured {unit}"] if counted else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "stage" else "right")
    measured = _by_stage(counted["pruned"].per_layer, stages) if counted else [None] * len(stages)
    start = 0
    for index, (stage, layers) in enumerate(zip(stages, measured)):
        cells = [str(index), f"{start}..{start + stage.layers - 1}", str(stage.tokens), f"{count([stage]) / scale:.3f}"]
        table.add_row(*cells, *([f"{sum(layers) / scale:.3f}"] if counted else []))
        start += stage.layers
    table.add_section()
    rows = [
        ("vanilla", f"0..{arch.layers - 1}", str(arch.visual_tokens), vanilla, counted and counted["vanilla"].total),
        ("pruned", "", "", pruned, counted and counted["pruned"].total),
    ]
    for name, span, tokens, analytic, measured_total in rows:
        table.add_row(
            name, span, tokens, f"{analytic / scale:.3f}", *([f"{measured_total / scale:.3f}"] if counted else [])
        )
    ratio = [f"{counted['pruned'].total / counted['vanilla'].total:.2%}"] if counted else []
    table.add_row("ratio", "", "", f"{pruned / vanilla:.2%}", *ratio)
    return table
