"""Options shared by the subcommands, so that every command spells them the same way, each
declared once. A command takes a group of them (`Where`, `Sampling`, `MethodOptions`) as one
parameter annotated with the group; `@command` spreads the group into Typer options and hands
the command the group back."""

import dataclasses
import functools
import inspect
import math
from typing import TYPE_CHECKING, Annotated

import typer

from ..engine import HYPERPARAMETERS, METHODS
from ..engine.settings import PruneSettings, budget_and_layer, check_hyperparameters, check_methods
from ..errors import UsageError, ascii_digits
from ..report import display
from ..runtime.presets import Preset

if TYPE_CHECKING:
    from ..runtime.loading import Loaded

DEFAULT_MODEL = "demo"  # bundled with the package: every command runs offline on a fresh machine

Model = Annotated[
    str,
    typer.Option(
        "-m",
        "--model",
        metavar="NAME|FOLDER|HUB_ID",
        help="A preset name (see profiles/), a local model folder or a hub id. Default: demo, the bundled model.",
    ),
]
Method = Annotated[str, typer.Option("--method", metavar="{" + "|".join(METHODS) + "}", help="The pruning method.")]
K = Annotated[
    int | None,
    typer.Option("-k", "--k", metavar="N", help="Visual tokens kept per image. Default: the preset's, else 128."),
]
Layer = Annotated[
    int | None,
    typer.Option(
        "--layer",
        metavar="L",
        help="Prune after layer L-1: layers 0..L-1 see every token. Default: the preset's, else 2.",
    ),
]
Device = Annotated[str, typer.Option("--device", metavar="{auto|cpu|cuda|cuda:N}", help="Where the model runs.")]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        metavar="{auto|balanced|balanced_low_0|sequential|FILE.json}",
        help="Spread the model with accelerate: auto, balanced, balanced_low_0, sequential (over every visible "
        "GPU, then CPU, then disk), or a JSON file mapping module names to cuda:N, cpu or disk.",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar="{auto|bfloat16|float16|float32}",
        help="Precision of the weights; auto: bfloat16 on GPU, float32 on CPU.",
    ),
]
RandomWeights = Annotated[
    bool,
    typer.Option(
        "--random-weights",
        help="Build the preset's architecture with random weights, no download: its cost measured anywhere "
        "(answers are noise).",
    ),
]
Layers = Annotated[
    int | None,
    typer.Option(
        "--layers",
        min=1,
        metavar="N",
        help="With --random-weights: only the first N decoder layers of the language model (timing on a small "
        "machine; every output says so).",
    ),
]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, metavar="N", help="Most tokens to generate.")]


def _finite(value: float) -> float:
    """inf and nan pass a range check (nan compares false with everything); neither samples text."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Temperature = Annotated[
    float,
    typer.Option("--temperature", min=0.0, callback=_finite, metavar="T", help="Sampling temperature; 0 is greedy."),
]
# torch seeds take 64 bits, and the random method multiplies the seed by a million: 32 bits fit.
Seed = Annotated[
    int, typer.Option("--seed", min=0, max=2**32 - 1, metavar="N", help="Seed for sampling and for the random method.")
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="{table|json|csv|markdown|latex}",
        help="table (default), json (as --json), or csv, markdown, latex: one row per result, for a spreadsheet "
        "or a paper.",
    ),
]


def output_format(format_: str | None, json: bool) -> str:
    """--format as given (--json is --format json), checked."""
    if format_ is not None and format_ not in display.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(display.FORMATS)}, got {format_!r}")
    if json and format_ not in (None, "json"):
        raise UsageError(f"--json and --format {format_} ask for two formats; give one")
    return "json" if json else format_ or "table"


Budgets = Annotated[
    str | None,
    typer.Option(
        "-k",
        "--k",
        metavar="N,...",
        help="Comma-separated budgets (visual tokens kept per image). Default: the preset's, else 128.",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads", min=1, max=1024, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)."
    ),
]


@dataclasses.dataclass
class Where:
    """Which model, on which device, in which precision."""

    model: Model = DEFAULT_MODEL
    device: Device = "auto"
    dtype: Dtype = "auto"
    device_map: DeviceMap = None
    threads: Threads = None
    random_weights: RandomWeights = False
    layers: Layers = None

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        return list(inspect.signature(cls).parameters.values())

    def load(self) -> "Loaded":
        """The model, loaded under a spinner, PyTorch's CPU thread count set first."""
        import huggingface_hub
        import torch
        from transformers.utils import logging as transformers_logging

        from ..runtime.loading import load

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        transformers_logging.set_verbosity_error()  # generate()'s notices are not the user's business
        # Our own spinner says what is loading; a download from the hub shows the hub's own progress
        # (bytes and time left) on stderr, which transformers' switch would silence too.
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()

        with display.status(f"Loading {self.model}"):
            loaded = load(
                self.model,
                device=self.device,
                dtype=self.dtype,
                device_map=self.device_map,
                random_weights=self.random_weights,
                layers=self.layers,
            )
        if loaded.random_weights:  # every command's output, whatever it prints later
            display.note(f"{loaded.label}: its answers mean nothing; its costs are those of the real shape")
        return loaded


@dataclasses.dataclass
class Sampling:
    """How answers are generated."""

    max_tokens: MaxTokens = 128
    temperature: Temperature = 0.0
    seed: Seed = 0

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        return list(inspect.signature(cls).parameters.values())


def _field_default(method: type, name: str):
    return next(field.default for field in dataclasses.fields(method) if field.name == name)


class MethodOptions(dict):
    """The pruning methods' hyperparameters as given on the command line (None: not given), one
    option per declaration in engine.HYPERPARAMETERS, its help naming the methods that take it."""

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        parameters = []
        for name, hyperparameter in HYPERPARAMETERS.items():
            takers = [method for method, cls in METHODS.items() if name in cls.hyperparameters()]
            defaults = {str(_field_default(METHODS[method], name)) for method in takers}
            metavar = "{" + "|".join(hyperparameter.choices) + "}" if hyperparameter.choices else "X"
            option = typer.Option(
                hyperparameter.flag,
                metavar=metavar,
                help=f"{', '.join(takers)}: {hyperparameter.help} Default: {', '.join(sorted(defaults))}.",
            )
            annotation = Annotated[hyperparameter.type | None, option]
            parameters.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
            )
        return parameters

    def given(self) -> dict:
        return {name: value for name, value in self.items() if value is not None}


class OneMethod:
    """--method, -k, --layer and the method's options: what run and chat prune by."""

    def __init__(self, method: str = "asap", k: int | None = None, layer: int | None = None, **hyperparameters):
        self.method, self.k, self.layer = method, k, layer
        self.hyperparameters = MethodOptions(hyperparameters)

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        def option(name: str, annotation, default) -> inspect.Parameter:
            return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

        return [option("method", Method, "asap"), option("k", K, None), option("layer", Layer, None)] + (
            MethodOptions.parameters()
        )

    def settings(self, preset: Preset | None = None, seed: int = 0) -> PruneSettings:
        """The checked settings; k and L not given come from `preset`."""
        return prune_settings([self.method], self.hyperparameters, preset, k=self.k, layer=self.layer, seed=seed)


class Comparison:
    """--methods, -k/--k budgets, --layer, the methods' options and --seed: what profile
    and eval compare several methods by. `DEFAULT_METHODS` is the command's own choice."""

    DEFAULT_METHODS = "vanilla,fastv,asap"

    def __init__(self, methods: str, budgets: str | None, layer: int | None, seed: int, **rest):
        self.methods, self.budgets, self.layer, self.seed = methods, budgets, layer, seed
        self.hyperparameters = MethodOptions(rest)

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        methods = Annotated[
            str,
            typer.Option(
                "--methods",
                metavar="METHOD,...",
                help=f"Comma-separated methods to compare, from {', '.join(METHODS)}.",
            ),
        ]
        own = [("methods", methods, cls.DEFAULT_METHODS), ("budgets", Budgets, None), ("layer", Layer, None)]
        own += [("seed", Seed, 0)]
        return [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, annotation, default in own
        ] + MethodOptions.parameters()

    def check(self) -> tuple[list[str], list[int] | None]:
        """Before the model loads: the methods (each known, each option taken by one of them at
        least) and the budgets (None: not given)."""
        names = method_list(self.methods)
        prune_settings(names, self.hyperparameters)
        return names, budget_list(self.budgets)

    def settings(self, preset: Preset | None) -> PruneSettings:
        """The settings the runs derive from (the first method's); k and L not given from `preset`."""
        return prune_settings(method_list(self.methods), self.hyperparameters, preset, layer=self.layer, seed=self.seed)


class EvalComparison(Comparison):
    DEFAULT_METHODS = "vanilla,fastv,random,asap"


def command(function):
    """`function` with every parameter annotated with an option group spread into the group's
    own options (what Typer reads), and called with the group rebuilt from them."""
    signature = inspect.signature(function, eval_str=True)
    flat, groups = [], {}
    for parameter in signature.parameters.values():
        group = parameter.annotation
        if not (isinstance(group, type) and hasattr(group, "parameters")):
            flat.append(parameter)
            continue
        members = group.parameters()
        groups[parameter.name] = (group, [member.name for member in members])
        flat.extend(members)

    @functools.wraps(function)
    def spread(**given):
        for name, (group, members) in groups.items():
            given[name] = group(**{member: given.pop(member) for member in members})
        return function(**given)

    # Typer passes every value by name: keyword-only keeps any order valid.
    flat = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in flat]
    spread.__signature__ = signature.replace(parameters=flat)
    spread.__annotations__ = {parameter.name: parameter.annotation for parameter in flat}
    return spread


def method_list(text: str) -> list[str]:
    """Comma-separated method names, each one known; one named twice runs once (as a budget does)."""
    names = list(dict.fromkeys(_split(text, "--methods")))
    check_methods(names)
    return names


def budget_list(text: str | None) -> list[int] | None:
    """Comma-separated budgets, each a whole number >= 1, one given twice counted once; None
    when not given."""
    if text is None:
        return None
    budgets = []
    for item in _split(text, "-k/--k"):
        if not ascii_digits(item) or int(item) < 1:
            raise UsageError(f"k must be a whole number of at least 1, got {item!r}")
        budgets.append(int(item))
    return list(dict.fromkeys(budgets))


def _split(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{option} is empty")
    return items


def prune_settings(
    methods: list[str], hyperparameters: MethodOptions, preset: Preset | None = None, **given
) -> PruneSettings:
    """PruneSettings for the first of `methods` from the options as given (None: not given),
    checked: k and layer left out come from the model's preset, anything else left out takes
    PruneSettings' or the method's own default; each hyperparameter must be taken by one of
    `methods` at least (a comparison of several applies it to those that take it)."""
    check_methods(methods)
    check_hyperparameters(hyperparameters.given(), methods)
    k, layer = budget_and_layer(preset, given.pop("k", None), given.pop("layer", None))
    chosen = {name: value for name, value in given.items() if value is not None}
    settings = PruneSettings(methods[0], k=k, layer=layer, **chosen, **hyperparameters.given())
    settings = settings if len(methods) == 1 else settings.for_method(methods[0])
    settings.check()
    return settings
