"""--model_args of lmms-eval's model `asap`, read and checked as asap's own options are: a bad
value is a UsageError with asap's message, raised before the model loads. No lmms-eval import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine import HYPERPARAMETERS
from ..engine.settings import PruneSettings, budget_and_layer, check_hyperparameters, check_methods
from ..errors import UsageError, whole_number

if TYPE_CHECKING:
    from ..runtime.loading import Loaded

WHERE = ("device", "dtype", "device_map")


@dataclass(frozen=True)
class ModelArgs:
    """--model_args as asap reads them: what to load, where, and how to prune."""

    pretrained: str
    method: str
    k: int | None  # None: the preset's, else PruneSettings' default (as the CLI)
    layer: int | None
    seed: int
    options: dict  # the method's hyperparameters given (lambda_max, ...)
    device: str
    dtype: str
    device_map: str | None

    @classmethod
    def parse(cls, given: dict) -> ModelArgs:
        """`given` as lmms-eval parsed `key=value,...` (numbers and true/false already converted)."""
        known = ("pretrained", "method", "k", "layer", "seed", *HYPERPARAMETERS, *WHERE)
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UsageError(f"model_args: asap takes no {', '.join(unknown)}; it takes {', '.join(known)}")
        method = _text(given.get("method", "asap"), "method")
        check_methods([method])
        options = {name: _option(name, given[name]) for name in HYPERPARAMETERS if name in given}
        check_hyperparameters(options, [method])
        return cls(
            pretrained=_text(given.get("pretrained", "demo"), "pretrained"),
            method=method,
            k=whole(given["k"], "k") if "k" in given else None,
            layer=whole(given["layer"], "layer") if "layer" in given else None,
            seed=whole(given.get("seed", 0), "seed", minimum=0),
            options=options,
            device=_text(given.get("device", "auto"), "device"),
            dtype=_text(given.get("dtype", "auto"), "dtype"),
            device_map=_text(given["device_map"], "device_map") if "device_map" in given else None,
        )

    def settings(self, loaded: Loaded) -> PruneSettings:
        """The pruning settings, k and L defaulting to the preset's; checked against the model."""
        k, layer = budget_and_layer(loaded.preset, self.k, self.layer)
        settings = PruneSettings(self.method, k, layer, self.seed, **self.options)
        settings.check(loaded.num_layers)
        return settings


def _text(value, name: str) -> str:
    text = str(value).strip()
    if isinstance(value, bool) or not text:
        raise UsageError(f"model_args: {name} needs a name, got {value!r}")
    return text


def whole(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool):  # lmms-eval reads "true" as True, which int() would take as 1
        value = str(value).lower()
    return whole_number(str(value), f"model_args: {name}", minimum)


def _option(name: str, value):
    """A method option as its Hyperparameter types it (range and choices are checked after)."""
    kind = HYPERPARAMETERS[name].type
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"model_args: {name} needs a number, got {value!r}")
        return float(value)
    return str(value)
