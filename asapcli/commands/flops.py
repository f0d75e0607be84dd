"""asap flops: theoretical FLOPs of a pruning schedule (paper Eq. 7-8), no weights needed; with
--measure, fvcore's count of a real forward beside them."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from ..engine.cost import budget_for, parse_targets
from ..engine.methods import KV_CACHES, METHODS, REFERENCE
from ..engine.settings import PruneSettings, budget_and_layer
from ..errors import UsageError
from ..measure.flops import FlopsCount, Storage
from ..report import display
from ..runtime.presets import built_from_numbers, load_architecture
from . import options

LAYER_HELP = "Prune after layer L-1; 0 prunes before the first layer."
SCHEDULE_HELP = "Several pruning steps LAYER:TOKENS,..., e.g. 2:960,16:480 (instead of -k/--layer)."
VISUAL_TOKENS_HELP = "Visual tokens before pruning (default: the model's)."
MEASURE_HELP = "Also count a real forward of the model's language model with fvcore (loads the model)."
KV_CACHE_HELP = (
    "How the KV storage counts the layers before the first pruning step: exact (every token they saw, as exact "
    "decoding needs) or compact (only what the step kept: the paper's Table 4). Values in --dtype's bytes; "
    "auto counts 16-bit."
)
TEXT_TOKENS_HELP = "The prompt's text tokens, held in every layer's KV cache beside the visual ones (default 0)."


@options.command
def flops_command(
    *,
    where: options.Where,
    budgets: options.Budgets = None,
    flops: options.FlopsTargets = None,
    layer: Annotated[int | None, typer.Option("--layer", metavar="L", help=LAYER_HELP)] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", metavar="LAYER:TOKENS,...", help=SCHEDULE_HELP)] = None,
    visual_tokens: Annotated[
        int | None, typer.Option("--visual-tokens", metavar="N", min=1, help=VISUAL_TOKENS_HELP)
    ] = None,
    gqa: Annotated[bool, typer.Option("--gqa", help="Count k/v projections at their grouped-query size.")] = False,
    measure: Annotated[bool, typer.Option("--measure", help=MEASURE_HELP)] = False,
    kv_cache: Annotated[
        str, typer.Option("--kv-cache", metavar="{exact|compact}", help=KV_CACHE_HELP, **options.choice(KV_CACHES))
    ] = "exact",
    text_tokens: Annotated[int, typer.Option("--text-tokens", metavar="N", min=0, help=TEXT_TOKENS_HELP)] = 0,
    pruning: options.FlopsMethod,
    json: options.json_flag() = False,
    format_: options.Format = None,
) -> None:
    """Theoretical FLOPs of the visual tokens, vanilla and pruned (paper Eq. 7-8)."""
    output = options.output_format(format_, json)
    request = {"layer": layer, "schedule": schedule, "visual_tokens": visual_tokens, "gqa": gqa, "measure": measure}
    request |= {"method": pruning.method, "options": options.options_given(pruning)}
    request |= {"random_weights": where.random_weights, "layers": where.layers}
    request |= {"storage": Storage(kv_cache, text_tokens, where.dtype)}
    ks = _at_flops(where, pruning, flops, layer, visual_tokens) if flops is not None else options.budget_list(budgets)
    if flops is not None and (budgets is not None or schedule is not None):
        raise UsageError("give --flops, -k or --schedule, one of them: --flops chooses k")
    counts = [FlopsCount.plan(where.model, k=k, **request) for k in ks or [None]]
    if measure:
        counts = _measured(where, counts)
    if output == "json":
        for count in counts:
            display.print_json(count.record())
        return
    if output == "csv":  # the records: one row per budget, the stages as their own columns
        display.print_csv([display.flat(dataclasses.asdict(count.record())) for count in counts])
        return
    if output != "table":
        display.show(_budgets_table(counts) if len(counts) > 1 else _table(counts[0]), output)
        return
    _show(counts, where.model, gqa, pruning.method)


def _at_flops(where: options.Where, pruning, flops: str, layer: int | None, visual_tokens: int | None) -> list[int]:
    """The method's k at each --flops share, on the model's numbers (as run chooses it)."""
    preset_layer = budget_and_layer(where.preset, None, layer)[1]
    method = PruneSettings(pruning.method, layer=preset_layer, **options.options_given(pruning)).method
    try:
        architecture = load_architecture(where.model, visual_tokens) if visual_tokens else where.flops_architecture()
    except UsageError as error:  # a tiling model: its tokens per image are for asap flops to be told
        raise UsageError(f"{error} (or --visual-tokens N, the count to choose k for)") from None
    ks = [budget_for(architecture, method, preset_layer, target) for target in parse_targets(flops)]
    if any(k >= architecture.visual_tokens for k in ks):
        raise UsageError(f"--flops {flops} keeps every visual token of {where.model}: nothing pruned to count")
    return ks


def _measured(where: options.Where, counts: list[FlopsCount]) -> list[FlopsCount]:
    """The counts with fvcore's beside them, their settings made (and checked) before the load."""
    settings = [count.measure_settings() for count in counts]
    loaded = where.load()
    with display.status("Counting FLOPs with fvcore"):
        first = counts[0].measured(loaded, settings[0])  # the vanilla forward is the same for every budget
        vanilla = first.counted[REFERENCE]
        return [first] + [count.measured(loaded, each, vanilla) for count, each in zip(counts[1:], settings[1:])]


def _show(counts: list[FlopsCount], model: str, gqa: bool, method: str) -> None:
    """The table and the lines under it that say how it was counted."""
    display.show(_budgets_table(counts) if len(counts) > 1 else _table(counts[0]))
    count = counts[0]
    display.out.print(f"Convention: {count.convention}.", markup=False, soft_wrap=True)
    if gqa and count.arch.kv_heads == count.arch.heads:
        display.note(f"--gqa changes nothing here: {model} has as many key/value heads as query heads.")
    if count.counted is not None:
        extra = ", ".join(f"{op} {n:,} FLOPs" for op, n in count.counted["pruned"].other.items()) or "none"
        display.out.print(
            f"Measured: fvcore's count of the language model run on {count.arch.visual_tokens} visual tokens "
            f"(linear layers and attention), pruned by {method}; the method's own scoring ops, counted "
            f"apart: {extra}.",
            markup=False,
            soft_wrap=True,
        )
        if METHODS[method].stage_scores:  # run through the layer's own modules, so fvcore counts them there
            display.out.print(
                f"{method} ranks each stage by the layer's own q and k projections of every token entering it: "
                "the measured column counts them in the stage's first layer, which Eq. 7 does not.",
                markup=False,
                soft_wrap=True,
            )
    display.out.print(_storage_line(count, alone=len(counts) == 1), markup=False, soft_wrap=True)
    for line in built_from_numbers(count.random_weights, count.arch.layers, count.full_layers or count.arch.layers):
        display.out.print(line, markup=False, soft_wrap=True)


def _storage_line(count: FlopsCount, alone: bool) -> str:
    """How the KV storage was counted, and for one budget its figures (several: the KV MiB column)."""
    storage = count.storage
    how = f"{storage.cache} cache, {storage.text_tokens} text tokens, {storage.dtype}"
    if not alone:
        return f"KV MiB: the KV cache after the prefill ({how}; --kv-cache, --text-tokens, --dtype)."
    vanilla, pruned = count.kv_bytes_vanilla, count.kv_bytes()
    return (
        f"KV storage after the prefill ({how}): vanilla {vanilla / 2**20:.2f} MiB, pruned {pruned / 2**20:.2f} MiB "
        f"({100 * pruned / vanilla:.1f}%)."
    )


def _budgets_table(counts: list[FlopsCount]) -> display.Shown:
    """Several budgets side by side: vanilla, then one row per k (Table 1's FLOPs column)."""
    first, measured = counts[0], counts[0].counted is not None
    unit, scale = display.flop_unit(first.vanilla)
    columns = ["k", "L", "tokens from L", unit, "ratio %", "KV MiB"]
    columns += [f"measured {unit}", "measured %"] if measured else []
    table = display.Shown(f"{first.label}: FLOPs of the visual tokens by budget", columns)
    vanilla = first.counted[REFERENCE].total if measured else None
    table.add_row(
        REFERENCE, "", str(first.arch.visual_tokens), f"{first.vanilla / scale:.3f}", "100.0",
        f"{first.kv_bytes_vanilla / 2**20:.2f}", *([f"{vanilla / scale:.3f}", "100.0"] if measured else []),
    )  # fmt: skip
    for count in counts:
        # a method in stages (pdrop, sparsevlm) prunes at several layers: each step, in order
        layers, tokens = ("/".join(str(step[i]) for step in count.steps) for i in (0, 1))
        pruned = count.counted["pruned"].total if measured else None
        table.add_row(
            str(count.budget), layers, tokens, f"{count.pruned / scale:.3f}",
            f"{100 * count.pruned / count.vanilla:.1f}", f"{count.kv_bytes() / 2**20:.2f}",
            *([f"{pruned / scale:.3f}", f"{100 * pruned / vanilla:.1f}"] if measured else []),
        )  # fmt: skip
    return table


def _table(count: FlopsCount) -> display.Shown:
    arch, stages, counted = count.arch, count.stages, count.counted
    vanilla, pruned = count.vanilla, count.pruned
    unit, scale = display.flop_unit(vanilla)
    columns = ["stage", "layers", "visual tokens", unit] + ([f"measured {unit}"] if counted else [])
    table = display.Shown(f"{count.label}: FLOPs of the visual tokens", columns)
    measured = count.measured_by_stage() if counted else [None] * len(stages)
    start = 0
    for index, (stage, layers) in enumerate(zip(stages, measured)):
        cells = [
            str(index),
            f"{start}..{start + stage.layers - 1}",
            str(stage.tokens),
            f"{count.flops([stage]) / scale:.3f}",
        ]
        table.add_row(*cells, *([f"{sum(layers) / scale:.3f}"] if counted else []))
        start += stage.layers
    table.add_section()
    rows = [
        (REFERENCE, f"0..{arch.layers - 1}", str(arch.visual_tokens), vanilla, counted and counted[REFERENCE].total),
        ("pruned", "", "", pruned, counted and counted["pruned"].total),
    ]
    for name, span, tokens, analytic, measured_total in rows:
        table.add_row(
            name, span, tokens, f"{analytic / scale:.3f}", *([f"{measured_total / scale:.3f}"] if counted else [])
        )
    ratio = [f"{counted['pruned'].total / counted[REFERENCE].total:.2%}"] if counted else []
    table.add_row("ratio", "", "", f"{pruned / vanilla:.2%}", *ratio)
    return table
