"""What the user asked a pruning run for (PruneSettings) and the checks on it; no model needed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UsageError
from . import HYPERPARAMETERS, METHODS, make_method

if TYPE_CHECKING:
    from ..runtime.presets import Preset


class PruneSettings:
    """A method, its budget k, the layer L, the seed (random's selection), and the method's
    hyperparameters as given (see engine.HYPERPARAMETERS); one not given takes the method's own
    default and reads as None here."""

    def __init__(self, method: str = "asap", k: int = 128, layer: int = 2, seed: int = 0, **hyperparameters):
        unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
        if unknown:
            raise TypeError(f"PruneSettings got unknown hyperparameters {', '.join(unknown)}")
        self.method, self.k, self.layer, self.seed = method, k, layer, seed
        self.hyperparameters = {name: value for name, value in hyperparameters.items() if value is not None}

    def __getattr__(self, name: str):
        if name in HYPERPARAMETERS:
            return self.__dict__.get("hyperparameters", {}).get(name)
        raise AttributeError(name)

    def __eq__(self, other) -> bool:
        return isinstance(other, PruneSettings) and vars(self) == vars(other)

    def __repr__(self) -> str:
        given = "".join(f", {name}={value!r}" for name, value in self.hyperparameters.items())
        return f"PruneSettings({self.method!r}, k={self.k}, layer={self.layer}, seed={self.seed}{given})"

    def replace(self, **changes) -> PruneSettings:
        fields = {"method": self.method, "k": self.k, "layer": self.layer, "seed": self.seed, **self.hyperparameters}
        return PruneSettings(**{**fields, **changes})

    def for_method(self, method: str, k: int | None = None) -> PruneSettings:
        """These settings for another method (and budget), as a comparison of several runs them:
        each method keeps the hyperparameters it takes (--positions renumber stays with the
        methods that prune before the language model, --lambda-max with the SG-BiMask ones)."""
        taken = METHODS[method].hyperparameters()
        kept = {name: value for name, value in self.hyperparameters.items() if name in taken}
        return PruneSettings(method, self.k if k is None else k, self.layer, self.seed, **kept)

    def method_options(self) -> dict:
        """The method's own hyperparameters as it runs (each one given, else the method's
        default), and the seed of a method that draws its tokens."""
        method = make_method(self.method, seed=self.seed, **self.hyperparameters)
        taken = METHODS[self.method].hyperparameters() + (["seed"] if hasattr(method, "seed") else [])
        return {name: getattr(method, name) for name in taken}

    def check(self, num_layers: int | None = None) -> None:
        """Raise UsageError for a value out of range, or a hyperparameter the method does not
        take; the layer's upper bound needs the model."""
        check_methods([self.method])
        for name in ("k", "layer", "seed"):  # a float layer would never match a layer index: nothing pruned
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{name} must be a whole number, got {value!r}")
        if self.k < 1:
            raise UsageError(f"k must be at least 1, got {self.k}")
        if self.layer < 0 or (self.layer == 0 and not METHODS[self.method].before_llm):  # 0: what divprune, pool do
            raise UsageError(f"layer must be at least 1 (layers 0..L-1 see every token), got {self.layer}")
        method = METHODS[self.method]
        prunes_after_layer = method.prunes and not method.before_llm  # the others never read L
        if num_layers is not None and prunes_after_layer and self.layer > num_layers - 1:
            none_left = "; a model of one decoder layer has none to prune after" if num_layers < 2 else ""
            raise UsageError(
                f"layer must be in 1..{num_layers - 1} for this model ({num_layers} decoder layers), "
                f"got {self.layer}{none_left}"
            )
        check_hyperparameters(self.hyperparameters, [self.method])


def budget_and_layer(preset: Preset | None, k: int | None, layer: int | None) -> tuple[int, int]:
    """k and L as given, else the preset's, else PruneSettings' defaults."""
    defaults = PruneSettings()
    k = k if k is not None else preset.k if preset is not None and preset.k is not None else defaults.k
    layer = (
        layer
        if layer is not None
        else preset.layer
        if preset is not None and preset.layer is not None
        else defaults.layer
    )
    return k, layer


def check_methods(methods: list[str]) -> None:
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")


def check_hyperparameters(given: dict, methods: list[str]) -> None:
    """Every hyperparameter given has a value it takes and is taken by one of `methods` at least
    (a comparison of several applies each to those that take it); else a UsageError that names
    what the method takes."""
    for name, value in given.items():
        problem = HYPERPARAMETERS[name].problem(value)
        if problem:
            raise UsageError(problem)
    for name, value in given.items():
        if value == HYPERPARAMETERS[name].implied:
            continue
        if not any(name in METHODS[method].hyperparameters() for method in methods):
            raise UsageError(refusal(name, value, methods))


def refusal(name: str, value, methods: list[str]) -> str:
    hyperparameter = HYPERPARAMETERS[name]
    takers = [method for method, cls in METHODS.items() if name in cls.hyperparameters()]
    take_it = f"{', '.join(takers)} take{'s' if len(takers) == 1 else ''} it"
    takers = ", ".join(takers)
    if hyperparameter.refusal:
        return hyperparameter.refusal.format(value=value, takers=takers, method=", ".join(methods))
    if len(methods) > 1:
        return f"{hyperparameter.flag} is not an option of {', '.join(methods)}; {take_it}"
    (method,) = methods
    taken = [HYPERPARAMETERS[other].flag for other in METHODS[method].hyperparameters()]
    takes = f"{method} takes {', '.join(taken)}" if taken else f"{method} takes none of the method options"
    return f"{hyperparameter.flag} is not an option of {method} ({takes}); {take_it}"
