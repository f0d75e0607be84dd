"""What one method costs on one input: prefill time, peak memory, KV-cache storage, decoding
speed, and the theoretical FLOPs beside them. `asap profile` runs it per method and budget.

On CUDA the figures are CUDA-event time and `torch.cuda.max_memory_allocated`; on CPU they are
wall time (perf_counter) and the peak of the CPU allocator's live bytes recorded by the torch
profiler. Memory is counted above what was allocated before the prefill (the weights), so it is
what the prefill itself needs: activations, scores, masks and the KV cache it leaves behind.

A batch of N is N copies of the sample in one forward (each row its own plan, as `asap run`
batches them): its images/s beside batch 1's is what batching buys on this device.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from PIL import Image
from transformers import BatchFeature, DynamicCache

from ..engine import PruningMethod, cost
from ..engine.session import pruned_as
from ..engine.settings import MethodGrid, PruneSettings
from ..errors import AsapError
from ..records import ProfileRow
from ..runtime import machine
from ..runtime.generation import context_length, kv_cache_bytes, to_device
from ..runtime.inputs import build_batch_inputs
from ..runtime.loading import Loaded
from ..runtime.presets import built_from_numbers
from . import stability
from .stability import Spread

T = TypeVar("T")


@dataclass
class Measurement:
    method: str
    k: int | None  # None: a method that prunes nothing (vanilla)
    layer: int  # L as it pruned: its first step came after layer L-1 (0: before the language model)
    batch: int  # samples in the forward; the token, FLOPs and ratio figures are per sample
    visual_tokens: int
    kept_tokens: int
    merged_tokens: int
    tflops: float  # Eq. 7, the visual tokens in the language model
    flops_ratio: float  # Eq. 8
    prompt_flops_ratio: float  # Eq. 8 counted over every prompt token, text included
    kv_cache_bytes: int  # the whole batch's, as is the peak memory
    kv_cache: str | None  # --kv-cache as it ran (exact, compact); None: a method that takes none
    peak_memory_bytes: int
    prefill_seconds: list[float] = field(default_factory=list)  # one per round, in round order
    decode_step_seconds: list[float] = field(default_factory=list)  # one per decoded token (every row's)
    busy_cpus: float | None = None  # CPUs other work kept busy while the rounds ran (machine.runnable_elsewhere)

    @property
    def prefill(self) -> Spread:
        return Spread.of(self.prefill_seconds)

    @property
    def decode(self) -> Spread:
        return Spread.of(self.decode_step_seconds)

    @property
    def images_per_second(self) -> float:
        """Prefill throughput: samples (one image each) prefilled per second."""
        return self.batch / self.prefill.median

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens of every row per second, at the median step."""
        return self.batch / self.decode.median


def prefill(loaded: Loaded, inputs: BatchFeature, settings: PruneSettings):
    """One pruned prefill of a whole batch, a plan per row: (logits of the last token, cache,
    what the first row's prefill pruned)."""
    with torch.inference_mode(), pruned_as(loaded.model, settings) as pruning:
        output = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1], output.past_key_values, pruning.prefills[0].prompt(0)


def decode_step(loaded: Loaded, logits: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One greedy token on `cache`, whatever it is (end-of-text does not stop it); its logits. No
    padding mask: the rows of a profiling batch are copies of one sample, none is padded."""
    with torch.inference_mode():
        token = logits.argmax(dim=-1, keepdim=True)
        return loaded.model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]


def timed(device: torch.device, work: Callable[[], T]) -> tuple[float, T]:
    """Seconds `work` took, and what it returned: CUDA events on a GPU (synchronised before and
    after), wall time on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = work()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000, result
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def peak_memory(device: torch.device, work: Callable[[], T]) -> tuple[int, T]:
    """The most memory allocated at any moment of `work`, above what was allocated before it,
    and what `work` returned (held until the count ends, so a cache left behind counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        result = work()
    return _cpu_peak(profiler.events()), result


def _cpu_peak(events) -> int:
    """Replay the profiler's allocations (attributed to the op that made them, self only, so
    nested ops count once) and frees ('[memory]' events) in time order; return the peak."""
    live = peak = 0
    for event in sorted(events, key=lambda event: event.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side prints a line to fd 2 on start and stop; stderr is ours."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure(
    loaded: Loaded,
    batches: list[BatchFeature],
    runs: list[PruneSettings],
    *,
    repeats: int = 5,
    warmup: int = 1,
    decode_tokens: int = 16,
    on_step: Callable[[], None] | None = None,
) -> list[Measurement]:
    """Time `warmup` + `repeats` prefills of every run on every batch (the median of the repeats
    is its time), interleaved round by round so that a machine that speeds up or slows down
    meanwhile affects them all alike; then per run and batch one more prefill to count memory,
    and decoding on its cache. The results go run by run, the batches in the order given."""
    device = loaded.device
    batches = [to_device(loaded, inputs) for inputs in batches]
    cases = [(settings, inputs) for settings in runs for inputs in batches]
    step = on_step or (lambda: None)
    times: list[list[float]] = [[] for _ in cases]
    busy: list[int | None] = []  # other processes' runnable tasks, read after each timed prefill
    for round_index in range(warmup + repeats):
        for (settings, inputs), case_times in zip(cases, times):
            elapsed, _ = timed(device, lambda settings=settings, inputs=inputs: prefill(loaded, inputs, settings))
            if round_index >= warmup:
                case_times.append(elapsed)
                busy.append(machine.runnable_elsewhere())
            step()
    known = [count for count in busy if count is not None]
    results = []
    for (settings, inputs), case_times in zip(cases, times):
        result = _costs(loaded, inputs, settings, case_times, decode_tokens)
        result.busy_cpus = sum(known) / len(known) if known else None
        results.append(result)
        step()
    return results


def step_count(runs: int, batch_sizes: int, warmup: int, repeats: int) -> int:
    """The steps measure() reports: each timed prefill, then each run's memory and decoding."""
    cases = runs * batch_sizes
    return cases * (warmup + repeats) + cases


def _costs(
    loaded: Loaded, inputs: BatchFeature, settings: PruneSettings, times: list[float], decode_tokens: int
) -> Measurement:
    """Memory and KV cache of one more prefill, decoding speed on its cache, FLOPs in theory."""
    device = loaded.device
    peak, (logits, cache, pruned) = peak_memory(device, lambda: prefill(loaded, inputs, settings))
    cache_bytes = kv_cache_bytes(cache)
    logits = decode_step(loaded, logits, cache)  # warms the decode path
    decoding = []
    for _ in range(decode_tokens):
        elapsed, logits = timed(device, lambda logits=logits: decode_step(loaded, logits, cache))
        decoding.append(elapsed)

    batch, prompt = inputs["input_ids"].shape
    visual = pruned.visual_tokens
    flops = pruned.tflops(loaded.text_config)  # the method's own schedule, in stages or not, as the engine ran it
    prompt_steps = [(layer, prompt - (visual - left)) for layer, left in pruned.steps]  # the text is never pruned
    return Measurement(
        method=settings.method.name,
        k=settings.budget,
        layer=pruned.layer,
        batch=batch,
        visual_tokens=visual,
        kept_tokens=pruned.kept_tokens,
        merged_tokens=pruned.merged_tokens,
        tflops=flops.pruned,
        flops_ratio=flops.ratio,
        prompt_flops_ratio=cost.visual_flops(loaded.text_config, prompt, prompt_steps).ratio,
        kv_cache_bytes=cache_bytes,
        kv_cache=settings.method.options().get("kv_cache"),
        peak_memory_bytes=peak,
        prefill_seconds=times,
        decode_step_seconds=decoding,
    )


def runs(grid: MethodGrid, num_layers: int) -> list[PruneSettings]:
    """The grid's runs grouped by method in the order named (the table reads method by method,
    each method's budgets in their order), each checked against the model's layers."""
    named = [method.name for method in grid.methods]
    grouped = sorted(grid.runs(), key=lambda settings: named.index(settings.method.name))  # stable: budgets keep order
    return [settings.for_model(num_layers) for settings in grouped]


def _check_fits(loaded: Loaded, prompt_tokens: int, decode_tokens: int) -> None:
    """The prompt and the decoded tokens fit the model's context: past it a model answers noise, and
    the figures measured there would be of positions it was never built for."""
    limit = context_length(loaded)
    if prompt_tokens + decode_tokens > limit:
        raise AsapError(
            f"the prompt is {prompt_tokens} tokens (image tokens included) and --decode-tokens asks for "
            f"{decode_tokens} more: the model's context holds {limit}; shorten the prompt or decode at most "
            f"{max(limit - prompt_tokens, 0)}"
        )


def profile(
    loaded: Loaded,
    *,
    model: str,
    prompt: str,
    picture: Image.Image,
    settings: list[PruneSettings],
    batch: int = 1,
    repeats: int = 10,
    warmup: int = 1,
    decode_tokens: int = 16,
    on_step: Callable[[], None] | None = None,
) -> list[ProfileRow]:
    """`asap profile`: the sample prefilled under every settings, at batch 1 and at `batch`
    (copies of it), measured side by side (see measure()); a record per run and batch size, each
    with its spread and its verdict (measure.stability)."""
    batches = [build_batch_inputs(loaded.processor, [(prompt, picture)] * size) for size in sorted({1, batch})]
    _check_fits(loaded, int(batches[0]["input_ids"].shape[1]), decode_tokens)
    load_start = machine.load_average()
    results = measure(
        loaded, batches, settings, repeats=repeats, warmup=warmup, decode_tokens=decode_tokens, on_step=on_step
    )
    context = conditions(loaded, int(batches[0]["input_ids"].shape[1]), repeats, warmup)
    context |= {"load_average_start": load_start, "load_average_end": machine.load_average()}
    under = stability.Conditions(
        rounds=repeats,
        steps=decode_tokens,
        threads=1 if context["threads"] is None else context["threads"],  # a GPU's launches: one host thread
        cpus=context["cpus_available"],
        busy=results[0].busy_cpus,
    )
    found = loaded.environment
    return [
        ProfileRow(model=model, **context, **_figures(result, results, under), environment=found) for result in results
    ]


def _figures(result: Measurement, results: list[Measurement], under: stability.Conditions) -> dict:
    """One measurement's figures with their spread: its time beside vanilla's at the same batch
    size (round by round), its throughput beside its own at batch 1, and its verdict."""
    # k is None only for a method that prunes nothing: the reference every time is set against
    vanilla = next((other for other in results if other.k is None and other.batch == result.batch), None)
    single = next(other for other in results if (other.method, other.k, other.batch) == (result.method, result.k, 1))
    ratio = None
    if vanilla is not None:
        ratio = stability.median_interval(stability.paired_ratios(result.prefill_seconds, vanilla.prefill_seconds))
    prefill, decode = result.prefill, result.decode
    pruned = ratio if result is not vanilla else None  # vanilla's own ratio is 1 by construction
    verdict = stability.judge(prefill, decode, pruned, result.prompt_flops_ratio, under)
    return {
        "method": result.method,
        "k": result.k,
        "layer": result.layer,
        "batch": result.batch,
        "visual_tokens": result.visual_tokens,
        "kept_tokens": result.kept_tokens,
        "merged_tokens": result.merged_tokens,
        "tflops": result.tflops,
        "flops_ratio": result.flops_ratio,
        "prompt_flops_ratio": result.prompt_flops_ratio,
        "kv_cache_bytes": result.kv_cache_bytes,
        "kv_cache": result.kv_cache,
        "peak_memory_bytes": result.peak_memory_bytes,
        "prefill_seconds": prefill.median,
        "prefill_seconds_iqr": prefill.iqr,
        "prefill_seconds_all": result.prefill_seconds,
        "time_ratio": ratio.median if ratio else None,
        "time_ratio_interval": [ratio.low, ratio.high] if ratio else None,
        "time_ratio_confidence": ratio.confidence if ratio else None,
        "images_per_second": result.images_per_second,
        "throughput_ratio": result.images_per_second / single.images_per_second,
        "decode_tokens_per_second": result.decode_tokens_per_second,
        "decode_step_seconds": decode.median,
        "decode_step_seconds_iqr": decode.iqr,
        "decode_step_seconds_all": result.decode_step_seconds,
        "busy_cpus": result.busy_cpus,
        "stable": verdict.stable,
        "unstable": verdict.reasons,
    }


def conditions(loaded: Loaded, prompt_tokens: int, repeats: int, warmup: int) -> dict:
    """What every figure of a measurement depends on: where it ran and how it was timed."""
    on_gpu = loaded.device.type == "cuda"
    return {
        "random_weights": loaded.random_weights,
        "decoder_layers": loaded.num_layers,
        "decoder_layers_full": loaded.full_layers or loaded.num_layers,
        "device": str(loaded.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "threads": None if on_gpu else torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "time": "cuda_events" if on_gpu else "cpu_wall",
        "memory": "cuda_max_memory_allocated" if on_gpu else "cpu_allocator_peak",
        "cpus_available": machine.available_cpus(),
    }


def how_measured(rows: Sequence[ProfileRow], methods: Sequence[type[PruningMethod]], batch: int) -> list[str]:
    """The lines under a table of measurements that say what each figure is and how it was got."""
    row = rows[0]
    on_gpu = row.time == "cuda_events"
    time = "CUDA-event time" if on_gpu else "wall time"
    memory = "torch.cuda.max_memory_allocated" if on_gpu else "CPU allocator peak (torch profiler)"
    repeats, warmup = row.repeats, row.warmup
    load = (
        "unknown" if row.load_average_start is None else f"{row.load_average_start:.1f} -> {row.load_average_end:.1f}"
    )
    busy = "" if row.busy_cpus is None else f"; other work kept {row.busy_cpus:.1f} of them busy during the rounds"
    notes = [
        f"{row.environment.timed_on}, {row.dtype}; {row.prompt_tokens} prompt tokens; {_where_pruned(rows, methods)}.",
        "TFLOPs, FLOPs %: paper Eq. 7-8, visual tokens only; prompt %: the same count over every prompt token.",
        (
            f"kept: of {row.visual_tokens} visual tokens; ms: the prefill's {time}, median of {_rounds(repeats)} "
            f"after {warmup} warm-up, methods interleaved; IQR %: the rounds' interquartile range over that median."
        ),
    ]
    if any(other.time_ratio is not None for other in rows):
        notes.append(
            "time %: the median of each round's time over vanilla's in that round; interval: of that median "
            f"(distribution-free; {row.time_ratio_confidence or 0:.1%} confidence at {_rounds(repeats)})."
        )
    notes += [
        f"peak MB: {memory} during prefill, above the weights, KV cache included; tok/s: decoding, at the median step.",
        f"{row.cpus_available} CPUs, load average {load}{busy}; !: a figure the warning says not to trust.",
    ]
    notes += built_from_numbers(row.random_weights, row.decoder_layers, row.decoder_layers_full)
    if batch > 1:
        notes.append(
            f"n: samples in one forward (batch {batch}: {batch} copies of the sample); img/s: samples prefilled per second, "
            "vs 1: over batch 1's for the same method; KV, peak and decode tok/s: the whole batch's."
        )
    return notes


def _where_pruned(rows: Sequence[ProfileRow], methods: Sequence[type[PruningMethod]]) -> str:
    """Where each method pruned, in its own words: after layer L-1, before layer 0, or in stages."""
    kinds = {method.name: method for method in methods}
    said: dict[str, list[str]] = {}
    for row in rows:
        method = kinds.get(row.method)
        if row.k is None or method is None:
            continue
        if method.before_llm:
            where = "before layer 0 (L=0)"
        elif method.reads_layer:
            where = f"pruned after layer {row.layer - 1} (L={row.layer})"
        else:
            where = f"in stages, the first after layer {row.layer - 1} (L={row.layer})"
        said.setdefault(where, [])
        if row.method not in said[where]:  # one per method, whatever its budgets and batch sizes
            said[where].append(row.method)
    return "; ".join(f"{', '.join(names)}: {where}" for where, names in said.items()) or "nothing pruned"


def _rounds(count: int) -> str:
    return f"{count} round{'' if count == 1 else 's'}"
