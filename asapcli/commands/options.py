"""Options shared by the subcommands, so that every command spells them the same way, each
declared once. A command takes a group of them (a dataclass of options: `Where`, `Sampling`,
`OneMethod`, `Comparison`) as one parameter annotated with the group; `@command` spreads the
group into Typer options and hands the command the group back. An option whose help differs by
command (--json says what it prints) is declared once as a function of that help."""

import dataclasses
import functools
import inspect
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..engine import DEFAULT_METHOD, HYPERPARAMETERS, METHODS
from ..engine.cost import budget_for, parse_targets
from ..engine.methods import DEFAULT_COMPARISON, DEFAULT_EVALUATION, DEFAULT_SIDE_BY_SIDE
from ..engine.settings import MethodGrid, PruneSettings, budget_and_layer, check_layer_read, check_numbers
from ..errors import AsapError, UsageError, ascii_digits, not_one_of, whole_number
from ..report import display
from ..runtime import sampling
from ..runtime.machine import THREADS_RULE, choose_threads, surely_no_cuda
from ..runtime.presets import (
    Preset,
    check_cls_tower,
    check_tiles,
    find_preset,
    flops_architecture,
    preset_names,
)

if TYPE_CHECKING:
    from ..runtime.loading import Loaded


def choice(values: tuple[str, ...], pattern: str | None = None) -> dict:
    """typer.Option keywords that check a value against `values` (or the regular expression
    `pattern`) as the command line is parsed, before anything heavy is imported, with the closest
    value as a suggestion, and complete it in the shell."""

    def parse(text: str) -> str:
        if text in values or (pattern is not None and re.fullmatch(pattern, text)):
            return text
        raise typer.BadParameter(not_one_of(text, values))

    return {"parser": parse, "autocompletion": lambda incomplete: [v for v in values if v.startswith(incomplete)]}


def _choices(values: tuple[str, ...], what: str) -> dict:
    """_choice for a comma-separated list of `values` (--methods)."""
    single = choice(values)["parser"]

    def parse(text: str) -> str:
        for item in (item.strip() for item in text.split(",") if item.strip()):
            try:
                single(item)
            except typer.BadParameter as error:
                raise typer.BadParameter(str(error)) from None
        return text

    def complete(incomplete: str) -> list[str]:
        done, _, last = incomplete.rpartition(",")
        return [f"{done},{v}" if done else v for v in values if v.startswith(last)]

    return {"parser": parse, "autocompletion": complete}


def _budgets(text: str) -> str:
    """-k as a comma-separated list of whole numbers of at least 1, checked as it is parsed."""
    try:
        budget_list(text)
    except UsageError as error:
        raise typer.BadParameter(str(error)) from None
    return text


def _budget(text: str) -> int:
    """One -k, a whole number of at least 1, checked as it is parsed."""
    try:
        return whole_number(text, "k")
    except UsageError as error:
        raise typer.BadParameter(str(error)) from None


def _whole_option(flag: str, text: str) -> int:
    """A whole-number option as written (ASCII digits, a sign allowed), its own rule checked later."""
    body = text.strip().removeprefix("-")
    if not ascii_digits(body):
        raise typer.BadParameter(f"{text!r} is not a whole number")
    return int(text)


def _seed(value: int) -> int:
    """--seed checked as it is parsed, in the settings' words."""
    try:
        check_numbers(seed=value)
    except UsageError as error:
        raise typer.BadParameter(str(error)) from None
    return value


DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")  # runtime.loading.DTYPES, without importing torch

DEFAULT_MODEL = "demo"  # bundled with the package: every command runs offline on a fresh machine
# --methods unless told: profile's, eval's, compare's (the registry's choices, as the option spells them)
COMPARED, EVALUATED, SIDE_BY_SIDE = (
    ",".join(m) for m in (DEFAULT_COMPARISON, DEFAULT_EVALUATION, DEFAULT_SIDE_BY_SIDE)
)

Model = Annotated[
    str,
    typer.Option(
        "-m",
        "--model",
        metavar="NAME|FOLDER|HUB_ID",
        help="A preset name (asap models lists them), a local model folder or a hub id. Default: demo, the bundled model.",
        autocompletion=lambda incomplete: [name for name in preset_names() if name.startswith(incomplete)],
    ),
]
Method = Annotated[
    str,
    typer.Option(
        "--method", metavar="{" + "|".join(METHODS) + "}", help="The pruning method.", **choice(tuple(METHODS))
    ),
]
K = Annotated[
    int | None,
    typer.Option(
        "-k", "--k", metavar="N", help="Visual tokens kept per image. Default: the preset's, else 128.", parser=_budget
    ),
]
Layer = Annotated[
    int | None,
    typer.Option(
        "--layer",
        metavar="L",
        help="Prune after layer L-1: layers 0..L-1 see every token. Default: the preset's, else 2.",
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="{auto|cpu|cuda|cuda:N}",
        help="Where the model runs.",
        **choice(("auto", "cpu", "cuda"), pattern=r"cuda:\d+"),
    ),
]
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
        **choice(DTYPE_NAMES),
    ),
]
RANDOM_WEIGHTS_HELP = (
    "Build the preset's architecture with random weights, no download: its cost measured anywhere (answers are noise)."
)
LAYERS_HELP = (
    "With --random-weights: only the first N decoder layers of the language model (timing on a small machine; "
    "every output says so)."
)
RandomWeights = Annotated[bool, typer.Option("--random-weights", help=RANDOM_WEIGHTS_HELP)]
Layers = Annotated[int | None, typer.Option("--layers", min=1, metavar="N", help=LAYERS_HELP)]


def max_tokens(help: str = "Most tokens to generate."):
    return Annotated[int, typer.Option("--max-tokens", min=1, metavar="N", help=help)]


MaxTokens = max_tokens()


def _finite(value: float) -> float:
    """inf and nan pass a range check (nan compares false with everything); neither samples text."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Temperature = Annotated[
    float,
    typer.Option("--temperature", min=0.0, callback=_finite, metavar="T", help="Sampling temperature; 0 is greedy."),
]
Seed = Annotated[
    int, typer.Option("--seed", callback=_seed, metavar="N", help="Seed for sampling and for the random method.")
]
TopP = Annotated[
    float | None,
    typer.Option(
        "--top-p", callback=lambda value: value if value is None else _finite(value), metavar="P",
        help="With --temperature: sample from the likeliest tokens whose probability adds up to P, in (0, 1].",
    ),
]  # fmt: skip
TopK = Annotated[
    int | None,
    typer.Option("--top-k", min=1, metavar="N", help="With --temperature: sample from the N likeliest tokens."),
]
System = Annotated[
    str | None,
    typer.Option(
        "--system",
        metavar="TEXT",
        help="A system prompt before the first message, as the model's chat template renders it.",
    ),
]


def json_flag(prints: str = "one JSON object on stdout instead of text"):
    """--json, its help saying what the command prints instead."""
    return Annotated[bool, typer.Option("--json", help=f"Print {prints}.")]


Json = json_flag()
Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="{table|json|csv|markdown|latex}",
        **choice(display.FORMATS),
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
        parser=_budgets,
    ),
]
Methods = Annotated[
    str,
    typer.Option(
        "--methods",
        metavar="METHOD,...",
        help=f"Comma-separated methods to compare, from {', '.join(METHODS)}.",
        **_choices(tuple(METHODS), "--methods"),
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        max=1024,
        metavar="N",
        help=f"CPU threads for PyTorch. Default: {THREADS_RULE}. Every summary and record says the count used.",
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

    @property
    def preset(self) -> Preset | None:
        """The preset -m names (None: a folder or a hub id), known before the model loads: what
        the settings' defaults come from, so that they are made and checked once, first."""
        return find_preset(self.model)

    @property
    def decoder_layers(self) -> int | None:
        """The decoder layers of the model, where known before it loads: --layers of one built
        with random weights, else a preset's [config] table (None: a folder, a hub id, the demo)."""
        preset = self.preset
        if self.layers is not None:
            return self.layers if self.random_weights or (preset and preset.random_weights) else None
        return preset.config["text_config"]["num_hidden_layers"] if preset and preset.config else None

    def check(self, runs: list[PruneSettings]) -> None:
        """Refuse before the long load (a 13B architecture takes a minute to build) what the
        model's config already tells: a layer it cannot have, a per-tile budget too small for a
        tiling model (LLaVA-NeXT)."""
        if (layers := self.decoder_layers) is not None:
            for settings in runs:
                settings.for_model(layers)
        check_cls_tower(self.model, runs)
        check_tiles(self.model, runs)
        if self.device_map is not None and self.device_map.endswith(".json") and not Path(self.device_map).is_file():
            raise UsageError(f"--device-map {self.device_map}: no such file (a JSON map of module names to devices)")
        if self.device.startswith("cuda") and surely_no_cuda():  # torch's import would take seconds to say so
            raise AsapError(f"device {self.device!r} asked for, but no CUDA GPU is available; use --device cpu")

    def flops_architecture(self):
        """What --flops counts by (presets.flops_architecture), cut to --layers where given."""
        architecture = flops_architecture(self.model)
        layers = self.decoder_layers
        return dataclasses.replace(architecture, layers=layers) if layers is not None else architecture

    def load(self) -> "Loaded":
        """The model, loaded under a spinner, PyTorch's CPU thread count set first."""
        import huggingface_hub
        import torch
        from transformers.utils import logging as transformers_logging

        from ..runtime.loading import load

        torch.set_num_threads(choose_threads(self.threads))  # every summary and record says the count
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
class WhereAnswering(Where):
    """Where, for a command that measures answers (eval): --random-weights and --layers, which it
    refuses (random weights answer at chance), are left out of its help."""

    random_weights: Annotated[bool, typer.Option("--random-weights", hidden=True)] = False
    layers: Annotated[int | None, typer.Option("--layers", min=1, hidden=True)] = None


@dataclasses.dataclass
class Sampling:
    """How answers are generated."""

    max_tokens: MaxTokens = 128
    temperature: Temperature = 0.0
    top_p: TopP = None
    top_k: TopK = None
    seed: Seed = 0
    system: System = None

    def __post_init__(self):
        sampling.check(self.temperature, self.top_p, self.top_k)  # --top-p without a temperature, say
        if self.system is not None and not self.system.strip():
            raise UsageError("--system is empty; give the system prompt's text, or leave --system out")

    @property
    def generation(self) -> dict:
        """The keywords of answering and chat for it."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed}  # fmt: skip


def _field_default(method: type, name: str):
    return next(field.default for field in dataclasses.fields(method) if field.name == name)


def _method_option(name: str, methods: dict[str, type]) -> tuple:
    """The option of one declared hyperparameter (None: not given), its help naming which of
    `methods` take it and their defaults."""
    hyperparameter = HYPERPARAMETERS[name]
    takers = [method for method, cls in methods.items() if name in cls.hyperparameters()]
    defaults = {str(_field_default(methods[method], name)) for method in takers}
    metavar = "{" + "|".join(hyperparameter.choices) + "}" if hyperparameter.choices else "X"
    checked = choice(hyperparameter.choices) if hyperparameter.choices else {}
    if hyperparameter.type is int and not checked:
        checked = {"parser": functools.partial(_whole_option, hyperparameter.flag)}
    option = typer.Option(
        hyperparameter.flag,
        metavar=metavar,
        help=f"{', '.join(takers)}: {hyperparameter.help} Default: {hyperparameter.default_rule or ', '.join(sorted(defaults))}.",
        **checked,
    )
    return (name, Annotated[hyperparameter.type | None, option], dataclasses.field(default=None, kw_only=True))


def method_options(name: str, methods: dict[str, type], leave_out: tuple[str, ...] = ()) -> type:
    """The hyperparameters of `methods` as given on the command line (None: not given), one
    option per declaration in engine.HYPERPARAMETERS that one of them takes (but `leave_out`);
    keyword-only, so that they follow a group's own options."""
    taken = [
        option
        for option in HYPERPARAMETERS
        if option not in leave_out and any(option in cls.hyperparameters() for cls in methods.values())
    ]
    group = dataclasses.make_dataclass(name, [_method_option(option, methods) for option in taken])
    group.__module__ = __name__
    return group


MethodOptions = method_options("MethodOptions", METHODS)
# asap flops counts every method's KV storage by its own --kv-cache, vanilla's too
CountedMethodOptions = method_options("CountedMethodOptions", METHODS, leave_out=("kv_cache",))


def options_given(group) -> dict:
    """The method options of `group` that were given (those it has)."""
    values = {name: getattr(group, name, None) for name in HYPERPARAMETERS}
    return {name: value for name, value in values.items() if value is not None}


FLOPS_HELP = (
    "A share of vanilla's visual FLOPs (25% or 0.25) in place of -k: each method gets the largest k that stays "
    "within it (Eq. 7-8, on the model's visual tokens per image), so that methods compare at equal cost."
)
FLOPS_TARGETS_HELP = FLOPS_HELP.replace("A share", "Comma-separated shares")
Flops = Annotated[str | None, typer.Option("--flops", metavar="PCT", help=FLOPS_HELP)]
FlopsTargets = Annotated[str | None, typer.Option("--flops", metavar="PCT,...", help=FLOPS_TARGETS_HELP)]


class _Settles:
    def settings(self, where: Where, seed: int = 0) -> PruneSettings:
        """The settings, made and checked once; k and L not given come from the model's preset,
        k from --flops where given."""
        if self.layer is not None:
            check_layer_read(METHODS[self.method])
        k, layer = budget_and_layer(where.preset, self.k, self.layer)
        settings = PruneSettings(self.method, k, layer, seed, **options_given(self))
        if self.flops is None:
            return settings
        if self.k is not None:
            raise UsageError("give -k or --flops, not both: --flops chooses k")
        targets = parse_targets(self.flops)
        if len(targets) > 1:
            raise UsageError(f"--flops takes one share here, got {self.flops!r}")
        if not settings.method.prunes:
            return settings
        return settings.with_budget(budget_for(where.flops_architecture(), settings.method, layer, targets[0]))


@dataclasses.dataclass
class OneMethod(MethodOptions, _Settles):
    """--method, -k, --layer and the method's options: what run and chat prune by."""

    method: Method = DEFAULT_METHOD
    k: K = None
    flops: Flops = None
    layer: Layer = None


@dataclasses.dataclass
class FlopsMethod(CountedMethodOptions):
    """--method and its options, as run takes them: what asap flops counts the schedule of."""

    method: Method = DEFAULT_METHOD


@dataclasses.dataclass
class Comparison(MethodOptions):
    """--methods, -k/--k budgets, --layer, the methods' options and --seed: what compare, profile
    and eval compare several methods by. A subclass gives the command's own default --methods."""

    methods: Methods = COMPARED
    budgets: Budgets = None
    flops: FlopsTargets = None
    layer: Layer = None
    seed: Seed = 0

    def grid(self, where: Where | None, *, reference: bool = False) -> MethodGrid:
        """The methods at their budgets, made and checked once, before the model loads: budgets
        and L not given come from the model's preset, each method's own budget from --flops
        where given (None: no model, the defaults); `reference`: the unpruned reference runs first,
        named or not."""
        names, preset = method_list(self.methods), where.preset if where is not None else None
        pruners = [METHODS[name] for name in names if name in METHODS and METHODS[name].prunes]
        if self.layer is not None and pruners and not any(cls.reads_layer for cls in pruners):
            for cls in pruners:  # no method named reads L: one in stages says why
                check_layer_read(cls)
        layer = budget_and_layer(preset, None, self.layer)[1]
        common = {"layer": layer, "seed": self.seed, "reference": reference, **options_given(self)}
        if self.flops is None:
            return MethodGrid(names, self.budgets_for(preset), **common)
        if self.budgets is not None:
            raise UsageError("give -k or --flops, not both: --flops chooses each method's k")
        targets, architecture = parse_targets(self.flops), where.flops_architecture()
        return MethodGrid(names, [], targets=targets, budget_for=functools.partial(budget_for, architecture), **common)

    def budgets_for(self, preset: Preset | None) -> list[int]:
        """-k as given, else the preset's k."""
        return budget_list(self.budgets) or [budget_and_layer(preset, None, None)[0]]


@dataclasses.dataclass
class EvalComparison(Comparison):
    methods: Methods = EVALUATED

    def budgets_for(self, preset: Preset | None) -> list[int]:
        """Table 1's budgets, largest first: -k as given, else the preset's list, else its k."""
        budgets = budget_list(self.budgets) or (list(preset.budgets) if preset and preset.budgets else None)
        return sorted(set(budgets), reverse=True) if budgets else super().budgets_for(preset)


def command(function):
    """`function` with every parameter annotated with an option group (a dataclass of options)
    spread into the group's own options (what Typer reads), and called with the group rebuilt
    from them."""
    signature = inspect.signature(function, eval_str=True)
    flat, groups = [], {}
    for parameter in signature.parameters.values():
        group = parameter.annotation
        if not (isinstance(group, type) and dataclasses.is_dataclass(group)):
            flat.append(parameter)
            continue
        members = list(inspect.signature(group, eval_str=True).parameters.values())
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
    """Comma-separated method names (MethodGrid checks each is known); one named twice runs once
    (as a budget does)."""
    return list(dict.fromkeys(_split(text, "--methods")))


def budget_list(text: str | None) -> list[int] | None:
    """Comma-separated budgets, each a whole number >= 1, one given twice counted once; None
    when not given."""
    if text is None:
        return None
    return list(dict.fromkeys(whole_number(item, "k") for item in _split(text, "-k/--k")))


def _split(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{option} is empty")
    return items
