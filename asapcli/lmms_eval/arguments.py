"""--model_args of lmms-eval's model `asap`, read and checked as asap's own options are: the
pruning settings are made (and checked, in asap's words) where the arguments are read, before the
model loads; only the layer's upper bound waits for the model. No lmms-eval import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine import DEFAULT_METHOD, HYPERPARAMETERS, METHODS
from ..engine.cost import budget_for, parse_targets
from ..engine.settings import PruneSettings, budget_and_layer, check_layer_read
from ..errors import UsageError, whole_number
from ..runtime.presets import check_tiles, find_preset, flops_architecture

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
    threads: int | None  # PyTorch's CPU threads; None: machine.choose_threads' default, as the CLI's
    prune: PruneSettings  # made from the above, k and L defaulting to the preset's (as the CLI)

    @classmethod
    def parse(cls, given: dict) -> ModelArgs:
        """`given` as lmms-eval parsed `key=value,...` (numbers and true/false already converted)."""
        known = ("pretrained", "method", "k", "flops", "layer", "seed", "threads", *HYPERPARAMETERS, *WHERE)
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UsageError(f"model_args: asap takes no {', '.join(unknown)}; it takes {', '.join(known)}")
        method = _text(given.get("method", DEFAULT_METHOD), "method")
        pretrained = _text(given.get("pretrained", "demo"), "pretrained")
        k = whole(given["k"], "k") if "k" in given else None
        layer = whole(given["layer"], "layer") if "layer" in given else None
        if layer is not None and method in METHODS:
            check_layer_read(METHODS[method], "layer")
        seed = whole(given.get("seed", 0), "seed", minimum=0)
        options = {name: given[name] for name in HYPERPARAMETERS if name in given}
        prune = PruneSettings(method, *budget_and_layer(find_preset(pretrained), k, layer), seed, **options)
        if "flops" in given:
            prune = _at_flops(prune, pretrained, k, given["flops"])
        try:
            check_tiles(pretrained, [prune])
        except UsageError as error:
            raise UsageError(f"model_args: {error}") from None
        return cls(
            pretrained=pretrained,
            method=method,
            k=k,
            layer=layer,
            seed=seed,
            options=prune.hyperparameters,
            device=_text(given.get("device", "auto"), "device"),
            dtype=_text(given.get("dtype", "auto"), "dtype"),
            device_map=_text(given["device_map"], "device_map") if "device_map" in given else None,
            threads=whole(given["threads"], "threads") if "threads" in given else None,
            prune=prune,
        )

    def settings(self, loaded: Loaded) -> PruneSettings:
        """The pruning settings, checked against the model (the layer's upper bound)."""
        return self.prune.for_model(loaded.num_layers)


def _at_flops(prune: PruneSettings, pretrained: str, k: int | None, flops) -> PruneSettings:
    """`prune` at the largest k within the FLOPs share `flops` (--flops of the CLI)."""
    if k is not None:
        raise UsageError("model_args: give k or flops, not both: flops chooses k")
    try:
        (target,) = parse_targets(str(flops)) if "," not in str(flops) else (None,)
    except UsageError as error:
        raise UsageError(f"model_args: {str(error).replace('--flops', 'flops')}") from None
    if target is None:
        raise UsageError(f"model_args: flops takes one share, got {flops!r}")
    if not prune.method.prunes:
        return prune
    try:
        return prune.with_budget(budget_for(flops_architecture(pretrained, "flops"), prune.method, prune.layer, target))
    except UsageError as error:
        raise UsageError(f"model_args: {str(error).replace('give --flops ', 'give flops=')}") from None


def _text(value, name: str) -> str:
    text = str(value).strip()
    if isinstance(value, bool) or not text:
        raise UsageError(f"model_args: {name} needs a name, got {value!r}")
    return text


def whole(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool):  # lmms-eval reads "true" as True, which int() would take as 1
        value = str(value).lower()
    return whole_number(str(value), f"model_args: {name}", minimum)
