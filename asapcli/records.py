"""What every command's --json prints: one frozen dataclass per kind of record, whose fields are
the JSON keys (units in the names: `_seconds`, `_bytes`, `tflops`). The same figure has the same
key in every record. The cores build them from their results; display.print_json writes them
(dataclasses.asdict).
README.md ("JSON output") lists them; tests/test_records.py checks each command's output
against these fields, key by key and type by type."""

from __future__ import annotations

from dataclasses import dataclass

from .engine.cost import Architecture


@dataclass(frozen=True)
class AnswerFigures:
    """One generated answer and what its prefill kept, saved and took."""

    answer: str
    visual_tokens: int  # image tokens in the prompt
    kept_tokens: int  # of them, those past layer L-1 (all when nothing is pruned)
    merged_tokens: int  # pruned tokens merged into kept ones (asap's anchors, pool's cells, ...)
    k_unmet: str | None  # why it kept another count than k asks (pdrop's stages, pool's grid, ...); None: it did not
    flops_ratio: float  # paper Eq. 8, visual tokens only
    prefill_seconds: float
    prefill_includes_warmup: bool  # the process's first generation
    decode_tokens_per_second: float | None  # None: under 8 decoded tokens
    generated_tokens: int
    ended: str  # end (the model ended it), max-tokens, context (the model's context is full) or stopped


@dataclass(frozen=True)
class Answer(AnswerFigures):
    """`asap run --json`: one per sample."""

    image: str
    prompt: str
    system: str | None  # the system prompt before the question (--system); None: none
    model: str
    method: str
    k: int | None  # None for vanilla, which uses no budget (as in profile and eval)
    layer: int | None  # 0: pruned before the language model; None for vanilla
    options: dict  # the method's own options as it ran: those given and its defaults ({} for vanilla)
    prompt_tokens: int
    device: str
    environment: Environment


@dataclass(frozen=True)
class CompareReport:
    """`asap compare --json`: one object."""

    model: str
    image: str
    prompt: str
    figure: str | None  # the file --out wrote; None without --out
    answers: list[Answer]  # vanilla first, then each method at each budget
    environment: Environment


@dataclass(frozen=True)
class ChatTurn(AnswerFigures):
    """`asap chat --json`: one per turn."""

    turn: int
    prompt: str
    images: list[str]  # the images this turn brought
    fed_tokens: int  # prompt tokens this turn prefilled (the rest came from the cache)
    cached_tokens: int  # the dialogue's tokens the cache continues from after the turn (/stats: each layer's)
    stopped: bool  # cut short by Ctrl-C
    environment: Environment


@dataclass(frozen=True)
class ChatStats:
    """`asap chat --json`, /stats: printed as {"stats": {...}}."""

    turns: int
    images: int
    pending_images: int
    k: int
    method: str
    layer: int
    cache_tokens_per_layer: list[int]
    kv_cache_bytes: int
    tflops_vanilla: float  # Eq. 7, the images brought so far
    tflops: float
    tflops_saved: float
    last_prefill_seconds: float | None  # None: no turn yet
    last_decode_tokens_per_second: float | None
    environment: Environment


@dataclass(frozen=True)
class ProfileRow:
    """`asap profile --json`: one per method, budget and batch size (JSON Lines)."""

    model: str
    random_weights: bool  # built from the preset's config (--random-weights): cost figures only
    decoder_layers: int  # the language model's decoder layers that ran
    decoder_layers_full: int  # the model's own count: larger when --layers cut it
    device: str
    dtype: str
    threads: int | None  # None on a GPU
    prompt_tokens: int
    repeats: int
    warmup: int
    time: str  # how time was measured: cuda_events or cpu_wall
    memory: str  # how memory was measured: cuda_max_memory_allocated or cpu_allocator_peak
    cpus_available: int  # the CPUs this process may use (affinity, cgroup quota)
    load_average_start: float | None  # 1-minute load average before the first timed round; None: not kept
    load_average_end: float | None  # and after the last measurement
    method: str
    k: int | None  # None: vanilla
    layer: int  # L as this method pruned: after layer L-1 (0: before the language model; in stages: the first)
    batch: int
    visual_tokens: int
    kept_tokens: int
    merged_tokens: int
    tflops: float
    flops_ratio: float
    prompt_flops_ratio: float  # Eq. 8 over every prompt token
    kv_cache_bytes: int
    kv_cache: str | None  # --kv-cache as it ran: exact, or compact (layers before the first step cut); None: takes none
    peak_memory_bytes: int
    prefill_seconds: float  # the median of the repeats
    prefill_seconds_iqr: float  # their interquartile range
    prefill_seconds_all: list[float]  # one per round, in round order
    time_ratio: float | None  # the median of the rounds' time over vanilla's in the same round, same batch size
    time_ratio_interval: list[float] | None  # [low, high]: distribution-free interval of that median
    time_ratio_confidence: float | None  # the interval's confidence (0.95 or more from 6 rounds)
    images_per_second: float
    throughput_ratio: float  # over batch 1's
    decode_tokens_per_second: float  # every row's tokens, at the median step
    decode_step_seconds: float  # the median of the timed decoding steps
    decode_step_seconds_iqr: float
    decode_step_seconds_all: list[float]
    busy_cpus: float | None  # CPUs other processes kept busy while the rounds ran (runnable tasks, averaged)
    stable: bool  # no cause below: the times can be read as measured
    # what makes them unreliable, cause -> why in words; causes: few_rounds, few_steps (under 6),
    # prefill_spread, decode_spread (IQR over 10% of the median), under_flops (a time ratio under the
    # prompt's FLOPs ratio), load (its threads and other work's over the CPUs)
    unstable: dict[str, str]
    environment: Environment


@dataclass(frozen=True)
class EvalRow:
    """One method at one budget in `asap eval`."""

    method: str
    k: int | None  # None: vanilla
    options: dict  # the method's own options as it ran: those given and its defaults ({} for vanilla)
    flops_ratio: float
    accuracy: dict[str, float]  # per question type
    region_accuracy: dict[str, float]  # "top" / "bottom" of the image
    average: float  # the mean over question types
    relative: float | None  # average over vanilla's
    questions: int
    accuracy_ci95: dict[str, list[float]]  # per question type: Wilson 95% interval [low, high]
    average_ci95: list[float]  # 95% interval of the average (the types' Wilson intervals combined)


@dataclass(frozen=True)
class AttentionProfile:
    """Mean attention of the scoring queries at layer L-1: per image row, and per patch (rows of
    the patch grid, top first), under each mask."""

    queries: str  # last, text or all: the query rows whose attention is measured
    causal: list[float]
    sg_bimask: list[float]
    causal_patches: list[list[float]]
    sg_bimask_patches: list[list[float]]


@dataclass(frozen=True)
class EvalReport:
    """`asap eval --json`: one object."""

    model: str
    data: str  # the question file, or the synthetic scenes
    n: int
    layer: int
    partial: bool  # interrupted: each row scores the questions it answered
    results: list[EvalRow]
    attention_profile: AttentionProfile | None
    environment: Environment


@dataclass(frozen=True)
class LoggedAnswer:
    """`asap eval --log FILE`: one JSON line per answer."""

    method: str
    k: int | None
    index: int
    image: str | None  # None: a synthetic scene
    question: str
    type: str
    expected: str | list[str]  # a list where the question file accepts several answers
    answer: str
    correct: bool
    environment: Environment


@dataclass(frozen=True)
class FlopsStage:
    layers: int
    tokens: int
    tflops: float


@dataclass(frozen=True)
class MeasuredFlops:
    """fvcore's count of a real forward (flops --measure)."""

    tflops_vanilla: float
    tflops: float
    stages_tflops: list[float]
    method: str
    method_ops_tflops: dict[str, float]  # the method's own scoring ops, by operator
    counter: str


@dataclass(frozen=True)
class FlopsReport:
    """`asap flops --json`: one object (one per budget, as JSON Lines, for several -k)."""

    model: str
    method: str  # what prunes by the schedule (its own, for a budget)
    options: dict  # the method's own options given (--stage-ratio, ...)
    k: int | None  # the budget asked (-k, else the preset's); None for a --schedule
    layer: int | None  # the layer it prunes after (0: before the language model); None for a --schedule
    random_weights: bool  # the measured model was built with random weights (the counts do not depend on them)
    decoder_layers: int  # the layers counted (architecture.layers)
    decoder_layers_full: int  # the model's own count: larger when --layers cut it
    tflops_vanilla: float
    tflops: float
    flops_ratio: float
    stages: list[FlopsStage]
    architecture: Architecture
    convention: str
    measured: MeasuredFlops | None  # None: without --measure
    kv_cache: str  # how kv_bytes count the layers before the first pruning step: "exact" (all) or "compact"
    text_tokens: int  # the prompt's text tokens, held in every layer (--text-tokens)
    kv_dtype: str  # the values' dtype (--dtype; auto counts 16-bit)
    kv_bytes_vanilla: int  # the KV cache after a prefill of the text and every visual token (Table 4)
    kv_bytes: int  # the same, pruned by the schedule
    environment: Environment  # device and dtype None where no model was loaded (no --measure)


@dataclass(frozen=True)
class PresetInfo:
    """`asap models --json`: one per preset."""

    name: str
    description: str
    family: str | None  # the config's model_type (llava, llava_next, qwen2_5_vl, internvl); None: not told
    weights: str  # "bundled", the hub id they download from, or "architecture only"
    layers: int  # the language model's decoder layers
    visual_tokens: int  # per image, as the FLOPs count them
    context: int | None  # the language model's positions; None where the preset does not say
    k: int  # the default budget
    layer: int  # the default L
    budgets: list[int]  # eval's default budgets


@dataclass(frozen=True)
class Environment:
    """`asap env --json`, and in every record a run prints: the versions, device and date a result
    was measured with (as lmms-eval's results.json carries)."""

    asap: str
    python: str
    torch: str | None  # its installed version (None: not installed, as for the numbers of asap flops)
    transformers: str | None
    lmms_eval: str | None  # None: the eval extra is not installed
    platform: str
    device: str | None  # cpu, cuda or cuda:N; None where no model ran (asap flops without --measure)
    gpu: str | None  # the GPU's name; None on CPU
    cuda: str | None  # the CUDA version PyTorch was built with; None without a GPU
    dtype: str | None  # the model's; None where no model was loaded
    threads: int | None  # PyTorch's CPU threads; None on a GPU or where no model ran
    cpus_available: int  # the CPUs this process may use (affinity, cgroup quota)
    cpu_model: str | None
    load_average: float | None  # 1-minute, when the record was made
    gpu_driver: str | None  # NVIDIA's driver version; None without a GPU
    date: str  # UTC, ISO 8601

    @property
    def timed_on(self) -> str:
        """Where its times were taken, as a summary says it: the GPU's name, or `CPU, 2 threads`."""
        if self.gpu is not None:
            return self.gpu
        threads = self.threads or 1
        return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


RECORDS = (Answer, CompareReport, ChatTurn, ChatStats, ProfileRow, EvalReport, EvalRow, AttentionProfile, LoggedAnswer)
RECORDS += (FlopsReport, FlopsStage, MeasuredFlops, Architecture, PresetInfo, Environment)
