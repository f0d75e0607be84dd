"""asap models: the presets -m takes, what each is and what it needs, without loading any."""

from __future__ import annotations

from ..report import display
from . import options


@options.command
def models_command(*, json: options.json_flag("one JSON object per preset (JSON Lines)") = False) -> None:
    """List the presets -m takes: each model's family, weights, visual tokens, context and defaults."""
    from ..runtime.presets import preset_info, preset_names

    found = [preset_info(name) for name in preset_names()]
    if json:
        for info in found:
            display.print_json(info)
        return
    headers = ["preset", "family", "weights", "layers", "visual\ntokens", "context", "k", "L"]
    table = display.Shown("asap -m PRESET", headers, left=3)
    for info in found:
        table.add_row(
            info.name, info.family or "-", info.weights, str(info.layers), str(info.visual_tokens),
            "-" if info.context is None else str(info.context), str(info.k), str(info.layer),
        )  # fmt: skip
    display.show(table)
    notes = [f"{info.name}: {info.description}" for info in found]
    notes.append(
        "weights: bundled (offline), a hub id (downloaded once), or architecture only (--random-weights: "
        "cost figures, no answers); context: the language model's positions, image tokens included; "
        "k, L: the defaults. -m also takes a local folder or any hub id."
    )
    for note in notes:
        display.out.print(note, markup=False, soft_wrap=True)
