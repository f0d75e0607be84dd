"""load() -> Loaded: a transformers LVLM and its processor, with the pruned decoder installed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from .engine import PrunedDecoder, install
from .errors import AsapError, UsageError
from .presets import Preset, find_preset

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Loaded:
    model: PreTrainedModel
    processor: ProcessorMixin
    decoder: PrunedDecoder
    name: str
    preset: Preset | None

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.model.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AsapError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision is what LVLMs are served in on a GPU; CPU kernels are fastest in float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_source(model: str) -> tuple[str, Preset | None]:
    """A preset name, a local folder or a hub id -> what from_pretrained takes, and the preset."""
    preset = find_preset(model)
    if preset is not None:
        return preset.hub_id, preset
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser()), None
    if Path(model).expanduser().exists():
        raise UsageError(f"model {model!r} is a file; give a model folder, a preset name or a hub id")
    return model, None


def load(model: str, device: str = "auto", dtype: str = "auto") -> Loaded:
    source, preset = resolve_source(model)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    try:
        processor = AutoProcessor.from_pretrained(source)
        lvlm = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AsapError(f"cannot load model {model!r}: {reason}") from error
    if getattr(lvlm.config, "image_token_id", None) is None:
        raise AsapError(f"model {model!r} has no image_token_id in its config: asap prunes image tokens only")
    lvlm = lvlm.to(target).eval()
    decoder = install(lvlm)
    return Loaded(model=lvlm, processor=processor, decoder=decoder, name=model, preset=preset)
