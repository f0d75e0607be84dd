"""What the user asked a pruning run for, parsed once where it is made: PruneSettings (one method,
its budget, its layer) and MethodGrid (several methods at several budgets, as compare, profile
and eval run them). Every refusal of a setting is worded here, whichever way it came in (the CLI,
asapcli.pruned, lmms-eval's --model_args, asap flops). No model is needed, except for the layer's
upper bound: `for_model` checks that once the model is known, and the value says it was done."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from ..errors import UsageError, not_one_of
from .methods import DEFAULT_METHOD, HYPERPARAMETERS, METHODS, REFERENCE, PruningMethod

DEFAULT_K, DEFAULT_LAYER = 128, 2  # where neither the user nor the model's preset says


@dataclass(frozen=True, init=False)
class PruneSettings:
    """A method (the object, its hyperparameters as its fields: those given, else its defaults),
    its budget k, the layer L as given (the method's `pruning_layer` says where its plan prunes)
    and the seed. Made from names and numbers as the user gave them, and checked then; trusted
    after that."""

    method: PruningMethod
    k: int
    layer: int
    seed: int
    given: frozenset[str]  # the hyperparameters given; the others are the method's defaults
    # The decoder layers of the model these were checked against (for_model); None: not yet.
    num_layers: int | None = field(compare=False, repr=False)

    def __init__(
        self, method: str = DEFAULT_METHOD, k: int = DEFAULT_K, layer: int = DEFAULT_LAYER, seed: int = 0, **options
    ):
        unknown = sorted(set(options) - set(HYPERPARAMETERS))
        if unknown:  # asapcli.pruned(model, lamda_max=...): a UsageError, as the docstring promises
            takes = ", ".join(HYPERPARAMETERS)
            raise UsageError(f"unknown option {', '.join(unknown)}; the methods' options are {takes}")
        (cls,) = method_classes([method])
        check_numbers(k=k, layer=layer, seed=seed)
        check_layer(layer, [cls])
        given = check_options({name: value for name, value in options.items() if value is not None}, [cls])
        given = {name: value for name, value in given.items() if name in cls.hyperparameters()}  # not implied ones
        configured = _configured(cls, seed, given)
        check_budget(configured, k)
        _fill(self, method=configured, k=k, layer=layer, seed=seed, given=frozenset(given))

    @classmethod
    def _made(cls, method: PruningMethod, k: int, layer: int, seed: int, **checked) -> PruneSettings:
        """Settings from parts checked already (a MethodGrid's runs, these with one part new and
        checked): no check runs again. `checked`: `given`, and `num_layers` where known."""
        settings = object.__new__(cls)
        _fill(settings, method=method, k=k, layer=layer, seed=seed, **checked)
        return settings

    @property
    def first_layer(self) -> int:
        """L as it prunes: the layer its first step comes after (0: before the language model; a
        method in stages its own first stage's, whatever --layer says). Needs `for_model` first
        where the method's stages depend on the model's depth."""
        return self.method.stage_layers(self.layer, self.num_layers)[0]

    @property
    def budget(self) -> int | None:
        """k as a record reports it: None for a method that takes no budget (vanilla)."""
        return self.k if self.method.prunes else None

    @property
    def hyperparameters(self) -> dict:
        """The hyperparameters given, by name, in their declarations' order."""
        return {name: getattr(self.method, name) for name in HYPERPARAMETERS if name in self.given}

    def __repr__(self) -> str:
        given = "".join(f", {name}={value!r}" for name, value in self.hyperparameters.items())
        return f"PruneSettings({self.method.name!r}, k={self.k}, layer={self.layer}, seed={self.seed}{given})"

    def replace(self, **changes) -> PruneSettings:
        """New settings from these with `changes` (method by name), checked as any made anew."""
        fields = {"method": self.method.name, "k": self.k, "layer": self.layer, "seed": self.seed}
        return PruneSettings(**{**fields, **self.hyperparameters, **changes})

    def for_method(self, method: str, k: int | None = None) -> PruneSettings:
        """These settings for another method (and budget): it keeps the hyperparameters given that
        it takes (--positions renumber stays with the methods that prune before the language
        model, --lambda-max with the SG-BiMask ones)."""
        taken = {
            name: value for name, value in self.hyperparameters.items() if name in METHODS[method].hyperparameters()
        }
        return PruneSettings(method, self.k if k is None else k, self.layer, self.seed, **taken)

    def with_budget(self, k: int) -> PruneSettings:
        """These settings at budget `k` (checked: the rest was), still checked against the model
        they were (k has no bound a model sets)."""
        check_numbers(k=k)
        check_budget(self.method, k)
        return PruneSettings._made(self.method, k, self.layer, self.seed, given=self.given, num_layers=self.num_layers)

    def for_model(self, num_layers: int) -> PruneSettings:
        """These settings checked against a model of `num_layers` decoder layers (the layer's upper
        bound); settings checked against it already come back as they are."""
        if self.num_layers == num_layers:
            return self
        if self.method.reads_layer and num_layers < 2:
            raise UsageError(
                f"{self.method} prunes after a decoder layer L with layers after it; this model has "
                f"{num_layers} decoder layer{'' if num_layers == 1 else 's'}, so none to prune after"
            )
        if self.method.prunes and not self.method.stage_layers(self.layer, num_layers):  # pdrop's D/4.. on D = 1
            raise UsageError(
                f"{self.method} prunes in stages between decoder layers; this model has {num_layers} decoder "
                f"layer{'' if num_layers == 1 else 's'}, so no layer to prune before"
            )
        if self.method.reads_layer and self.layer > num_layers - 1:
            raise UsageError(
                f"layer must be in 1..{num_layers - 1} for this model ({num_layers} decoder layers), got {self.layer}"
            )
        return PruneSettings._made(self.method, self.k, self.layer, self.seed, given=self.given, num_layers=num_layers)


def _fill(settings: PruneSettings, num_layers: int | None = None, **fields) -> None:
    """The fields of frozen settings, set once as they are made."""
    for name, value in {**fields, "num_layers": num_layers}.items():
        object.__setattr__(settings, name, value)


def _configured(cls: type[PruningMethod], seed: int, options: Mapping) -> PruningMethod:
    """The method object: the options it takes (checked) as its fields, and the seed if it draws."""
    taken = {name: value for name, value in options.items() if name in cls.hyperparameters()}
    return cls(**taken, **({"seed": seed} if cls.draws() else {}))


@dataclass(frozen=True, init=False)
class MethodGrid:
    """Several methods compared at several budgets under one layer L, one seed and the method
    options given, each option applied to the methods that take it: what compare, profile and
    eval run. `reference`: the unpruned reference runs first whether named or not (compare's
    first column). Checked once where made, as PruneSettings are, against every method named.
    With `targets` (shares of vanilla's FLOPs: --flops) in place of budgets, `budget_for`
    (method, L, target) -> k gives each method its own budget at each target."""

    methods: tuple[type[PruningMethod], ...]
    budgets: tuple[int, ...]
    layer: int
    seed: int
    options: Mapping
    reference: bool
    pairs: tuple[tuple[type[PruningMethod], int], ...]  # the runs' methods and budgets, in runs' order

    def __init__(
        self,
        methods: Sequence[str],
        budgets: Sequence[int],
        *,
        layer: int = DEFAULT_LAYER,
        seed: int = 0,
        reference: bool = False,
        targets: Sequence[float] = (),
        budget_for: Callable[[PruningMethod, int, float], int] | None = None,
        **options,
    ):
        classes = method_classes(methods)
        check_numbers(layer=layer, seed=seed)
        for k in budgets:
            check_numbers(k=k)
        given = check_options({name: value for name, value in options.items() if value is not None}, classes)
        if reference and not any(not cls.prunes for cls in classes):
            classes = [METHODS[REFERENCE], *classes]
        check_layer(layer, classes)
        unpruned = [cls for cls in classes if not cls.prunes]
        pairs = [(cls, budgets[0] if budgets else DEFAULT_K) for cls in unpruned]  # a budget means nothing to them
        for budget in targets or budgets:  # each pruning method with the options it takes, at every budget
            for cls in classes:
                if cls.prunes:
                    method = _configured(cls, seed, {n: v for n, v in given.items() if n in cls.hyperparameters()})
                    pairs.append((cls, budget_for(method, layer, budget) if targets else budget))
                    check_budget(method, pairs[-1][1])
        values = {
            "methods": tuple(classes),
            "budgets": tuple(budgets),
            "layer": layer,
            "seed": seed,
            "pairs": tuple(pairs),
        }
        for name, value in {**values, "options": MappingProxyType(given), "reference": reference}.items():
            object.__setattr__(self, name, value)

    def runs(self) -> list[PruneSettings]:
        """Every run, in one order: the methods that prune nothing first, once each, then for each
        budget (or FLOPs target) in the order given, each pruning method in the order given."""
        return [self._settings(cls, k) for cls, k in self.pairs]

    def _settings(self, cls: type[PruningMethod], k: int) -> PruneSettings:
        given = {name: value for name, value in self.options.items() if name in cls.hyperparameters()}
        method = _configured(cls, self.seed, given)
        return PruneSettings._made(method, k, self.layer, self.seed, given=frozenset(given))


class Defaults(Protocol):
    """A model's own k and L, where it has them (runtime/presets.py's Preset)."""

    k: int | None
    layer: int | None


def budget_and_layer(preset: Defaults | None, k: int | None, layer: int | None) -> tuple[int, int]:
    """k and L as given, else the preset's, else PruneSettings' defaults."""
    k = k if k is not None else preset.k if preset is not None and preset.k is not None else DEFAULT_K
    if layer is None:
        layer = preset.layer if preset is not None and preset.layer is not None else DEFAULT_LAYER
    return k, layer


# ---- the refusals, each worded once ----------------------------------------------------------


def method_classes(names: Sequence[str]) -> list[type[PruningMethod]]:
    """The registered method of each name; a UsageError naming the first unknown one."""
    unknown = [name for name in names if not isinstance(name, str) or name not in METHODS]
    if unknown:
        raise UsageError(not_one_of(unknown[0], list(METHODS)))
    return [METHODS[name] for name in names]


def check_numbers(**numbers) -> None:
    """k, layer and seed are whole numbers (a float layer would never match a layer index:
    nothing pruned), and a budget k keeps one token at least."""
    for name, value in numbers.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{name} must be a whole number, got {value!r}")
    if "k" in numbers and numbers["k"] < 1:
        raise UsageError(f"k needs a whole number of at least 1, got {numbers['k']}")
    if "seed" in numbers and not 0 <= numbers["seed"] < SEEDS:
        raise UsageError(f"seed must be a whole number from 0 to {SEEDS - 1}, got {numbers['seed']}")


# torch seeds take 64 bits, and the random method multiplies the seed by a million: 32 bits fit.
SEEDS = 2**32


def check_budget(method: PruningMethod, k: int) -> None:
    """k is a budget the method, with its hyperparameters, can run at (VisionZip's split,
    SparseVLM's table)."""
    problem = method.budget_problem(k)
    if problem:
        raise UsageError(problem)


def check_layer_read(method: type[PruningMethod], flag: str = "--layer") -> None:
    """A layer the user gave for one method is one it prunes at: a method whose stages follow
    the model's depth (pdrop, sparsevlm) would ignore it without a word. (A comparison of several
    methods applies L to those that read it.)"""
    if not method.reads_layer and method.prunes and not method.before_llm:  # those say L = 0 themselves
        first = ", ".join(map(str, method().stage_layers(DEFAULT_LAYER, 32)))
        raise UsageError(
            f"{method.name} does not read {flag}: its stages sit at fixed fractions of the model's depth (layers "
            f"{first} of a 32-layer model); leave {flag} out"
        )


def check_layer(layer: int, methods: Sequence[type[PruningMethod]]) -> None:
    """L is one every method accepts (0 only for those that prune before the language model)."""
    if layer < 0 or any(layer < method.min_layer for method in methods):
        raise UsageError(f"layer must be at least 1 (layers 0..L-1 see every token), got {layer}")


def check_options(given: Mapping, methods: Sequence[type[PruningMethod]]) -> dict:
    """`given` hyperparameters parsed: each has a value it takes and is taken by one of `methods`
    at least (a comparison of several applies each to those that take it); else a UsageError
    that names what the method takes."""
    for name, value in given.items():
        problem = HYPERPARAMETERS[name].problem(value)
        if problem:
            raise UsageError(problem)
    names = [method.name for method in methods]
    for name, value in given.items():
        if value != HYPERPARAMETERS[name].implied and not any(name in m.hyperparameters() for m in methods):
            raise UsageError(refusal(name, value, names))
    return {name: HYPERPARAMETERS[name].parse(value) for name, value in given.items()}


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
