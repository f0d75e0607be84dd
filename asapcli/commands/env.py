"""asap env: the versions, device and threads asap runs with, to paste into a bug report."""

from __future__ import annotations

from ..report import display
from . import options


@options.command
def env_command(*, json: options.Json = False) -> None:
    """Print asap's, Python's, PyTorch's and transformers' versions, the device and the threads."""
    import dataclasses

    import torch

    from ..runtime.environment import default_device, environment
    from ..runtime.machine import choose_threads

    torch.set_num_threads(choose_threads())  # the threads a command started now would use
    found = environment(default_device())
    if json:
        display.print_json(found)
        return
    table = display.Shown("asap environment", ["", ""], left=2)
    for field in dataclasses.fields(found):
        value = getattr(found, field.name)
        table.add_row(field.name, "-" if value is None else str(value))
    display.show(table)
