"""`asap flops`' core: the FLOPs of the visual tokens of one model under one pruning schedule
(Eq. 7-8, from the model's config alone), fvcore's count of a real forward beside them when
measured, and the record --json prints (records.FlopsReport)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..engine import DEFAULT_METHOD, KV_CACHES, METHODS, REFERENCE, PruningMethod
from ..engine.cost import (
    CONVENTION,
    GQA_CONVENTION,
    VALUE_BYTES,
    Architecture,
    Stage,
    kv_storage,
    parse_schedule,
    pruning_schedule,
    schedule_flops,
)
from ..engine.settings import PruneSettings, budget_and_layer, check_layer_read, check_numbers, method_classes
from ..errors import UsageError
from ..records import Environment, FlopsReport, FlopsStage, MeasuredFlops
from ..runtime.environment import environment
from ..runtime.presets import check_cls_tower, check_tiles, find_preset, load_architecture, model_label

if TYPE_CHECKING:
    from ..runtime.loading import Loaded

COUNTER = "fvcore (multiply-accumulates) with a scaled_dot_product_attention handle"


@dataclass(frozen=True)
class Storage:
    """How the KV storage of a budget is counted: the cache mode, the prompt's text tokens (held
    in every layer), and the dtype of its values (auto: 16-bit, as checkpoints and GPUs hold them)."""

    cache: str = "exact"
    text_tokens: int = 0
    dtype: str = "float16"

    def __post_init__(self):
        if self.cache not in KV_CACHES:
            raise UsageError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {self.cache!r}")
        if self.text_tokens < 0:
            raise UsageError(f"--text-tokens needs a whole number of at least 0, got {self.text_tokens}")
        object.__setattr__(self, "dtype", "float16" if self.dtype == "auto" else self.dtype)


@dataclass(frozen=True)
class FlopsCount:
    model: str
    arch: Architecture
    steps: list[tuple[int, int]]  # (layer, tokens left from it on)
    stages: list[Stage]
    kv_fraction: float  # k/v projections at kv_heads / heads (grouped-query), else 1
    method: str  # what prunes in a measured forward
    budget: int | None  # k as asked (-k, else the preset's); None for a --schedule
    options: dict  # the method's own options given (--stage-ratio, ...), as run takes them
    counted: dict | None = None  # fvcore's CountedFlops, REFERENCE's (unpruned) and "pruned", once measured
    full_layers: int | None = None  # the model's own decoder layers, when --layers counts fewer (arch.layers)
    random_weights: bool = False  # the measured model is built with random weights
    environment: Environment | None = None  # the measured model's; None: numbers alone
    storage: Storage | None = None  # how its KV cache is counted (Table 4)

    @classmethod
    def plan(
        cls,
        model: str,
        *,
        k: int | None = None,
        layer: int | None = None,
        schedule: str | None = None,
        visual_tokens: int | None = None,
        gqa: bool = False,
        measure: bool = False,
        method: str = DEFAULT_METHOD,
        options: dict | None = None,
        random_weights: bool = False,
        layers: int | None = None,
        storage: Storage | None = None,
    ) -> FlopsCount:
        """The schedule that -k/--layer (else the preset's) or --schedule give, checked, on the
        architecture of `model`, cut to its first `layers` decoder layers when given: a budget's
        by the method with its own `options`, made as run makes it (PruneSettings); counted as
        fvcore counts (GQA-aware) when it is to be `measure`d, on a model built with random
        weights when `random_weights`."""
        options = options or {}
        if (random_weights or layers is not None) and not measure:
            raise UsageError("--random-weights and --layers build the model that --measure counts; add --measure")
        _checked(k, layer, schedule, method)
        if schedule is not None and options:  # the steps are given: the method's options would change nothing
            flags = ", ".join("--" + name.replace("_", "-") for name in options)
            raise UsageError(f"--schedule gives the pruning steps: {flags} would change nothing; give -k instead")
        arch = load_architecture(model, visual_tokens)
        full_layers = None
        if layers is not None and layers < arch.layers:
            arch, full_layers = replace(arch, layers=layers), arch.layers
        budget, steps = _steps(arch, model, k, layer, schedule, method, options)
        if schedule is not None:
            stages = pruning_schedule(arch.layers, arch.visual_tokens, steps)
        else:
            stages = _budget_stages(arch, steps, k, model)
        # fvcore counts what the model computes: grouped-query k/v projections at their real size.
        kv_fraction = arch.kv_heads / arch.heads if gqa or measure else 1.0
        random_weights = random_weights or getattr(find_preset(model), "random_weights", False)
        measured_random = measure and random_weights
        counted = cls(
            model, arch, steps, stages, kv_fraction, method, budget, options, None, full_layers, measured_random
        )
        return replace(counted, storage=storage or Storage())

    def kv_bytes(self, stages: list[Stage] | None = None) -> int:
        """The KV storage of the pruned schedule (of `stages` where given), as `storage` counts it."""
        storage = self.storage or Storage()
        held = stages if stages is not None else self.stages
        return kv_storage(self.arch, held, storage.text_tokens, VALUE_BYTES[storage.dtype], storage.cache)

    @property
    def kv_bytes_vanilla(self) -> int:
        return self.kv_bytes([Stage(self.arch.layers, self.arch.visual_tokens)])

    def flops(self, stages: list[Stage]) -> float:
        return schedule_flops(stages, self.arch.hidden, self.arch.intermediate, self.kv_fraction)

    @property
    def vanilla(self) -> float:
        return self.flops([Stage(self.arch.layers, self.arch.visual_tokens)])

    @property
    def pruned(self) -> float:
        return self.flops(self.stages)

    @property
    def label(self) -> str:
        return model_label(self.model, self.random_weights, self.arch.layers, self.full_layers)

    @property
    def convention(self) -> str:
        return GQA_CONVENTION if self.kv_fraction != 1.0 else CONVENTION

    def measure_settings(self) -> PruneSettings:
        """What a measured forward prunes by, checked before the model loads."""
        if self.budget is not None:  # the method's own schedule, in stages or not, as a run prunes by it
            layer, k = self.steps[0][0], self.budget
        elif len(self.steps) == 1:
            ((layer, k),) = self.steps
        else:
            raise UsageError("--measure runs one pruning step: give -k/--layer, not a --schedule of several")
        # A method that prunes before the LLM ignores L (its step is at 0): any it accepts will do.
        method = METHODS[self.method]
        layer = layer if method.reads_layer else max(layer, method.min_layer)
        return PruneSettings(self.method, k=k, layer=layer, **self.options)

    def measured(self, loaded: Loaded, settings: PruneSettings, vanilla=None) -> FlopsCount:
        """This count with fvcore's, vanilla and pruned, of the loaded model's language model;
        `vanilla`: fvcore's vanilla count already made (one budget of several), not traced again."""
        from .measured_flops import count_flops  # fvcore only when asked for

        settings = settings.for_model(loaded.num_layers)
        tokens = self.arch.visual_tokens
        vanilla = vanilla if vanilla is not None else count_flops(loaded, tokens)
        counted = {REFERENCE: vanilla, "pruned": count_flops(loaded, tokens, settings)}
        return replace(self, counted=counted, environment=loaded.environment)

    def measured_by_stage(self) -> list[list[int]]:
        """fvcore's per-layer counts of the pruned forward, grouped by stage."""
        groups, start = [], 0
        for stage in self.stages:
            groups.append(self.counted["pruned"].per_layer[start : start + stage.layers])
            start += stage.layers
        return groups

    def record(self) -> FlopsReport:
        measured = None
        if self.counted is not None:
            vanilla, pruned = self.counted[REFERENCE], self.counted["pruned"]
            measured = MeasuredFlops(
                tflops_vanilla=vanilla.total / 1e12,
                tflops=pruned.total / 1e12,
                stages_tflops=[sum(layers) / 1e12 for layers in self.measured_by_stage()],
                method=self.method,
                method_ops_tflops={op: n / 1e12 for op, n in pruned.other.items()},
                counter=COUNTER,
            )
        single = self.budget is not None
        return FlopsReport(
            model=self.model,
            method=self.method,
            options=dict(self.options),
            k=self.budget,
            layer=self.steps[0][0] if single else None,
            random_weights=self.random_weights,
            decoder_layers=self.arch.layers,
            decoder_layers_full=self.full_layers or self.arch.layers,
            tflops_vanilla=self.vanilla / 1e12,
            tflops=self.pruned / 1e12,
            flops_ratio=self.pruned / self.vanilla,
            stages=[FlopsStage(stage.layers, stage.tokens, self.flops([stage]) / 1e12) for stage in self.stages],
            architecture=self.arch,
            convention=self.convention,
            measured=measured,
            kv_cache=(self.storage or Storage()).cache,
            text_tokens=(self.storage or Storage()).text_tokens,
            kv_dtype=(self.storage or Storage()).dtype,
            kv_bytes_vanilla=self.kv_bytes_vanilla,
            kv_bytes=self.kv_bytes(),
            environment=self.environment or environment(),
        )


def _steps(
    arch: Architecture, model: str, k: int | None, layer: int | None, schedule: str | None, method: str, options: dict
) -> tuple[int | None, list[tuple[int, int]]]:
    """The budget (None for a --schedule) and the pruning steps: the schedule's, or the method's
    own for the budget, the method made with its options as run makes it (PruneSettings)."""
    pruner = METHODS[method]
    budget = None
    if schedule is not None:
        steps = parse_schedule(schedule)
        asked, at = steps[-1][1], steps[0][0]
    else:
        budget, at = budget_and_layer(find_preset(model), k, layer)
        asked = budget
    # L = 0 before an in-LLM method is a count only (what pruning before the first layer would
    # save), which no run makes: the settings take the least layer it runs at.
    settings = PruneSettings(method, k=asked, layer=max(at, pruner.min_layer), **options)
    check_cls_tower(model, [settings])  # what asap run refuses has no schedule to count
    if schedule is None:
        check_tiles(model, [settings])
    if settings.method.counts_per_image:
        raise UsageError(
            f"{method} --adaptive keeps each image's own count, which no config tells: asap run --json gives its flops_ratio"
        )
    pruning = settings.method
    if schedule is None:  # its own schedule, as the engine prunes by it (several steps for one in stages)
        steps = pruning.schedule(arch.visual_tokens, budget, at, arch.layers) or [(at, budget)]
    if pruner.before_llm and len(steps) == 1:
        # The formula counts what the method does: divprune and pool prune before the first
        # layer whatever layer was asked (as asap run does), and pool keeps its square grid.
        ((_, budget),) = steps
        steps = [(0, pruning.kept_count(arch.visual_tokens, budget))]
    return budget, steps


def _checked(k: int | None, layer: int | None, schedule: str | None, method: str) -> type[PruningMethod]:
    """The method that prunes the count, once -k, --layer and --schedule are found to go together
    (the words of k's and the method's refusals are PruneSettings')."""
    if schedule is not None and (k is not None or layer is not None):
        raise UsageError("give either --schedule or -k/--layer, not both")
    if k is not None:
        check_numbers(k=k)
    if layer is not None and layer < 0:  # a schedule's step may prune before layer 0, whatever the method
        raise UsageError(f"layer must be at least 0 (0 prunes before the first layer), got {layer}")
    (pruner,) = method_classes([method])
    if layer is not None:
        check_layer_read(pruner)
    if schedule is not None:  # its own stages are what it prunes by: a schedule's steps would count another
        check_layer_read(pruner, "--schedule")
    if not pruner.prunes:
        raise UsageError(f"--method {method} prunes nothing: its count is the vanilla row of any other method's")
    return pruner


def _budget_stages(arch, steps: list[tuple[int, int]], k: int | None, model: str) -> list[Stage]:
    """The stages of a budget's steps; a budget that keeps every visual token is the preset's to
    give (a dense count), refused where -k asked for it."""
    if steps[0][1] < arch.visual_tokens:
        return pruning_schedule(arch.layers, arch.visual_tokens, steps)
    if k is not None:
        raise UsageError(
            f"-k {k} keeps all {arch.visual_tokens} visual tokens of {model}: it prunes nothing "
            f"(give k below {arch.visual_tokens})"
        )
    return [Stage(arch.layers, arch.visual_tokens)]  # the preset's k keeps them all
