"""Model presets: one TOML file per known model in `profiles/` (installed as `asapcli.profiles`).

A preset names where the model comes from (a hub checkpoint; `bundled`: a checkpoint folder
shipped inside the package; or `random_weights = true`: built from its [config] alone), the
architecture numbers the FLOPs formulas need (so that no weights are needed to compute them),
the default pruning layer and budgets, and the size of the built-in test pattern. Its [config]
table (the checkpoint's config.json, the fields that shape the model) and [processor] table
(the image processor's options) let `--random-weights` build the real architecture with random
weights, no download. A preset with none of these gives the architecture only.

Also what `-m MODEL` names (resolve_source) and the FLOPs numbers of any model without loading
it (load_architecture): both without torch, so that `asap flops` on a preset starts in a blink.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.cost import Architecture
from ..errors import AsapError, UsageError, first_line

if TYPE_CHECKING:
    from ..engine.settings import PruneSettings
    from ..records import PresetInfo


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None
    description: str
    architecture: Architecture
    layer: int
    k: int
    budgets: tuple[int, ...]
    bundled: str | None = None  # a save_pretrained folder inside the asapcli package
    config: dict | None = None  # the checkpoint's config.json, the fields --random-weights builds from
    processor: dict | None = None  # options of the image processor built with it
    random_weights: bool = False  # no checkpoint exists: always built from `config`
    pattern: tuple[int, int] = (336, 336)  # the built-in test pattern's width and height

    def bundled_path(self) -> Path | None:
        return Path(str(resources.files("asapcli") / self.bundled)) if self.bundled else None


def _profiles():
    """The preset files: imported straight from a source checkout, the checkout's own top-level
    `profiles/` folder (first: an editable install of another checkout maps `asapcli.profiles`
    to that checkout's folder); else the package data `asapcli.profiles`, which setuptools maps
    to it."""
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    if checkout.is_dir():
        return checkout
    return resources.files("asapcli.profiles")


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
        bundled=data.get("bundled"),
        config=data.get("config"),
        processor=data.get("processor"),
        random_weights=data.get("random_weights", False),
        pattern=tuple(defaults.get("pattern", (336, 336))),
    )


def preset_info(name: str) -> PresetInfo:
    """What `asap models` says of a preset, from its file and config alone."""
    from ..records import PresetInfo

    preset = get_preset(name)
    config = _config(name) or {}
    text = config.get("text_config") or {}
    weights = "bundled" if preset.bundled else "architecture only" if preset.random_weights else preset.hub_id
    return PresetInfo(
        name=name,
        description=preset.description,
        family=config.get("model_type"),
        weights=weights or "architecture only",
        layers=preset.architecture.layers,
        visual_tokens=preset.architecture.visual_tokens,
        context=text.get("max_position_embeddings"),
        k=preset.k,
        layer=preset.layer,
        budgets=list(preset.budgets),
    )


def get_preset(name: str) -> Preset:
    preset = find_preset(name)
    if preset is None:
        raise UsageError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return preset


def resolve_source(model: str) -> tuple[str | None, Preset | None]:
    """A preset name, a local folder or a hub id -> what from_pretrained takes (None for a preset
    without a checkpoint), and the preset."""
    if not model.strip():  # Path("") is the current folder, which would load as a model
        raise UsageError("-m/--model is empty; give a preset name, a model folder or a hub id")
    preset = find_preset(model)
    if preset is not None and preset.bundled:
        folder = preset.bundled_path()
        if not (folder / "config.json").is_file():
            raise AsapError(f"the bundled model of preset {model!r} is missing from this installation ({folder})")
        return str(folder), preset
    if preset is not None:
        return preset.hub_id, preset
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser()), None
    if Path(model).expanduser().exists():
        raise UsageError(f"model {model!r} is a file; give a model folder, a preset name or a hub id")
    if model.startswith((".", "/", "~")) or "\\" in model:  # a path, never a hub id (owner/name)
        raise UsageError(f"model folder {model!r} not found")
    if "/" not in model:  # LVLM hub ids are owner/name: a bare word is a preset name
        raise UsageError(
            f"unknown preset {model!r}; known presets: {', '.join(preset_names())} (or a folder, or a hub id)"
        )
    return model, None


def _config(model: str) -> dict | None:
    """The config of a preset or a local folder, as a dict (no weights, no transformers); None for a
    hub id or a config-less preset."""
    source, preset = resolve_source(model)
    if preset is not None and preset.config:
        return preset.config
    if source is not None and (Path(source) / "config.json").is_file():
        try:
            return json.loads((Path(source) / "config.json").read_text())
        except (OSError, ValueError):
            return None
    return None


def tiling_of(model: str) -> tuple[int, int] | None:
    """A tiling model's (LLaVA-NeXT's) most tower items per image (1 + the most tiles of its grid
    pinpoints, as engine/vision.py's Tiling counts them) and patches per item, from its config
    alone; None for a model that does not tile, or whose config does not say."""
    config = _config(model) or {}
    pinpoints, vision = config.get("image_grid_pinpoints"), config.get("vision_config") or {}
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if not pinpoints or not isinstance(size, int) or not isinstance(patch, int):
        return None
    tiles = max(-(-height // size) * -(-width // size) for height, width in pinpoints)
    return 1 + tiles, (size // patch) ** 2


def check_tiles(model: str, runs: list[PruneSettings]) -> None:
    """A budget that a [CLS] method, pruning each tower item of a tiling model alone, cannot split
    among them, refused in the words the engine would use once the image is encoded."""
    from ..engine.methods.tower import tiled_budget_problem  # torch-free at import, as the registry

    tiling = tiling_of(model) if any(settings.method.reads_vision for settings in runs) else None
    for settings in runs if tiling else []:
        if settings.method.reads_vision and (problem := tiled_budget_problem(settings.method, settings.k, *tiling)):
            raise UsageError(problem)


# The vision towers whose [CLS] token the [CLS] methods read (engine/vision.py finds it on the model)
CLS_TOWERS = ("clip_vision_model",)


def check_cls_tower(model: str, runs: list[PruneSettings]) -> None:
    """A [CLS] method on a model whose tower has none, refused from the config alone, before the
    load (engine/vision.py refuses it again on the loaded model)."""
    tower = vision_tower_type(model) if any(settings.method.reads_vision for settings in runs) else None
    if tower is None or tower in CLS_TOWERS:
        return
    method = next(settings.method for settings in runs if settings.method.reads_vision)
    raise UsageError(
        f"{method} ranks patches by the vision tower's [CLS] attention; {model}'s tower ({tower}) has no [CLS] "
        "token; use a CLIP-tower LLaVA model"
    )


def vision_tower_type(model: str) -> str | None:
    """The model_type of the vision tower of a preset or a local folder, from its config alone (no
    weights, no transformers); None where the config does not say (a hub id, a config-less preset)."""
    config = _config(model)
    if not config:
        return None
    vision = config.get("vision_config")
    if isinstance(vision, dict) and vision.get("model_type"):
        return vision["model_type"]
    # transformers' default tower where the config names none: LLaVA's a CLIP, others their own
    family = config.get("model_type")
    return "clip_vision_model" if family in ("llava", "llava_next") else family


def load_architecture(model: str, visual_tokens: int | None = None) -> Architecture:
    """The numbers the FLOPs formulas need, from a preset or a model's config alone (no weights).
    `visual_tokens` overrides the count; without it a config must tell it (LLaVA-1.5 style)."""
    source, preset = resolve_source(model)
    if preset is not None:
        if visual_tokens is None:
            return preset.architecture
        return replace(preset.architecture, visual_tokens=visual_tokens)
    from transformers import AutoConfig  # only for a model that is not a preset

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise AsapError(f"cannot read the config of {model!r}: {first_line(error)}") from error
    return architecture_of(config, model, visual_tokens)


def flops_architecture(model: str, flag: str = "--flops") -> Architecture:
    """What a FLOPs share (--flops) chooses k by: the model's numbers, read without its weights,
    with one visual-token count per image (a tiling model's varies with the image: refused)."""
    if tiling_of(model) is not None:
        raise UsageError(
            f"{flag} needs one visual-token count per image; {model} tiles each image by its size (LLaVA-NeXT): "
            f"give {'-k' if flag.startswith('--') else 'k'}"
        )
    return load_architecture(model)


def architecture_of(config, model: str, visual_tokens: int | None = None) -> Architecture:
    """The numbers the FLOPs formulas need, from a transformers config (a model's own)."""
    text = config.get_text_config()
    if visual_tokens is None:
        visual_tokens = _tokens_per_image(config)
    if visual_tokens is None:
        raise UsageError(f"cannot tell how many visual tokens {model!r} makes per image; pass --visual-tokens")
    heads = text.num_attention_heads
    return Architecture(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        visual_tokens=visual_tokens,
    )


def _tokens_per_image(config) -> int | None:
    """A fixed-resolution LLaVA-style config: (image / patch)^2 patches, plus CLS under 'full'.
    Tiling models (LLaVA-NeXT, ...) vary per image and return None."""
    if getattr(config, "image_grid_pinpoints", None) is not None:
        return None
    vision = getattr(config, "vision_config", None)
    if vision is None or not getattr(vision, "image_size", None) or not getattr(vision, "patch_size", None):
        return None
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


def model_label(name: str, random_weights: bool, layers: int, full_layers: int | None) -> str:
    """`name`, and "(random weights, first 4 of 32 layers)" where that applies: every table
    caption of a model built so says so."""
    notes = (["random weights"] if random_weights else []) + (
        [f"first {layers} of {full_layers} layers"] if full_layers is not None and layers < full_layers else []
    )
    return f"{name} ({', '.join(notes)})" if notes else name


def built_from_numbers(random_weights: bool, layers: int, full_layers: int) -> list[str]:
    """The lines that keep a figure of a model built from numbers from passing for a checkpoint's."""
    notes = []
    if random_weights:
        notes.append(
            "Random weights (built from the preset's config, no checkpoint): the model's cost, not its answers."
        )
    if layers < full_layers:
        notes.append(
            f"The language model cut to its first {layers} of {full_layers} decoder layers (--layers): "
            "not the full model's time, memory or FLOPs."
        )
    return notes
