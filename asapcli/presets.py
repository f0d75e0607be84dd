"""Model presets: one TOML file per known model in `profiles/` (installed as `asapcli.profiles`).

A preset names where the model comes from (a hub checkpoint; `bundled`: a checkpoint folder
shipped inside the package; or `[random_weights]`: built from the numbers alone), the architecture numbers the FLOPs formulas need (so that no weights are
needed to compute them) and the default pruning layer and budgets. A preset with neither gives
the architecture only.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UsageError


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    visual_tokens: int


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None
    description: str
    architecture: Architecture
    layer: int
    k: int
    budgets: tuple[int, ...]
    random_weights: dict | None = None  # the vision tower of a model built without a checkpoint
    bundled: str | None = None  # a save_pretrained folder inside the asapcli package

    def bundled_path(self) -> Path | None:
        return Path(str(resources.files("asapcli") / self.bundled)) if self.bundled else None


def _profiles():
    """The preset files: the package data `asapcli.profiles` once installed; imported straight
    from a source checkout (a non-editable install elsewhere, tests run in the checkout), the
    checkout's own top-level `profiles/` folder, which setuptools maps to it."""
    try:
        return resources.files("asapcli.profiles")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "profiles"


def preset_names() -> list[str]:
    return sorted(entry.name.removesuffix(".toml") for entry in _profiles().iterdir() if entry.name.endswith(".toml"))


def find_preset(name: str) -> Preset | None:
    entry = _profiles() / f"{name}.toml"
    if not entry.is_file():
        return None
    data = tomllib.loads(entry.read_text())
    defaults = data.get("defaults", {})
    return Preset(
        name=name,
        hub_id=data.get("hub_id"),
        description=data.get("description", ""),
        architecture=Architecture(**data["architecture"]),
        layer=defaults.get("layer", 2),
        k=defaults.get("k", 128),
        budgets=tuple(defaults.get("budgets", ())),
        random_weights=data.get("random_weights"),
        bundled=data.get("bundled"),
    )


def get_preset(name: str) -> Preset:
    preset = find_preset(name)
    if preset is None:
        raise UsageError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return preset
