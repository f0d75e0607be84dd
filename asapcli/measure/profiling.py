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
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from PIL import Image
from transformers import BatchFeature, DynamicCache

from ..engine import PruningMethod, schedule
from ..engine.block import pruned_as
from ..engine.plans import token_counts
from ..engine.settings import MethodGrid, PruneSettings
from ..errors import AsapError
from ..records import ProfileRow
from ..runtime.generation import context_length, kv_cache_bytes, to_device
from ..runtime.inputs import build_batch_inputs
from ..runtime.loading import Loaded
from ..runtime.presets import built_from_numbers

T = TypeVar("T")


@dataclass
class Measurement:
    method: str
    k: int | None  # None: a method that prunes nothing (vanilla)
    batch: int  # samples in the forward; the token, FLOPs and ratio figures are per sample
    visual_tokens: int
    kept_tokens: int
    merged_tokens: int
    tflops: float  # Eq. 7, the visual tokens in the language model
    flops_ratio: float  # Eq. 8
    prompt_flops_ratio: float  # Eq. 8 counted over every prompt token, text included
    kv_cache_bytes: int  # the whole batch's, as is the peak memory
    peak_memory_bytes: int
    prefill_seconds: list[float] = field(default_factory=list)
    decode_tokens_per_second: float = 0.0  # tokens of every row

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_seconds)

    @property
    def images_per_second(self) -> float:
        """Prefill throughput: samples (one image each) prefilled per second."""
        return self.batch / self.prefill_median


def prefill(loaded: Loaded, inputs: BatchFeature, settings: PruneSettings):
    """One pruned prefill of a whole batch, a plan per row: (logits of the last token, cache,
    the first row's plan)."""
    with torch.inference_mode(), pruned_as(loaded.model, settings) as pruning:
        output = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1], output.past_key_values, pruning.plans[0]


def decode(loaded: Loaded, logits: torch.Tensor, cache: DynamicCache, steps: int) -> None:
    """`steps` greedy tokens on `cache`, whatever they are (end-of-text does not stop it). No
    padding mask: the rows of a profiling batch are copies of one sample, none is padded."""
    with torch.inference_mode():
        for _ in range(steps):
            token = logits.argmax(dim=-1, keepdim=True)
            logits = loaded.model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]


def seconds(device: torch.device, work: Callable[[], object]) -> float:
    """Time `work`: CUDA events on a GPU, wall time on CPU; the device is synchronised first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


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
    for round_index in range(warmup + repeats):
        for (settings, inputs), case_times in zip(cases, times):
            elapsed = seconds(device, lambda settings=settings, inputs=inputs: prefill(loaded, inputs, settings))
            if round_index >= warmup:
                case_times.append(elapsed)
            step()
    results = []
    for (settings, inputs), case_times in zip(cases, times):
        results.append(_costs(loaded, inputs, settings, case_times, decode_tokens))
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
    peak, (logits, cache, plan) = peak_memory(device, lambda: prefill(loaded, inputs, settings))
    cache_bytes = kv_cache_bytes(cache)
    decode(loaded, logits, cache, 1)  # warm the decode path
    decode_time = seconds(device, lambda: decode(loaded, logits, cache, decode_tokens))

    batch, prompt = inputs["input_ids"].shape
    visual, kept = token_counts(plan)
    tflops, ratio = schedule.token_flops(loaded.text_config, visual, kept, plan.layer)
    _, prompt_ratio = schedule.token_flops(loaded.text_config, prompt, prompt - (visual - kept), plan.layer)
    return Measurement(
        method=settings.method.name,
        k=settings.k if plan.method.prunes else None,
        batch=batch,
        visual_tokens=visual,
        kept_tokens=kept,
        merged_tokens=plan.merged,
        tflops=tflops,
        flops_ratio=ratio,
        prompt_flops_ratio=prompt_ratio,
        kv_cache_bytes=cache_bytes,
        peak_memory_bytes=peak,
        prefill_seconds=times,
        decode_tokens_per_second=batch * decode_tokens / decode_time if decode_time > 0 else 0.0,
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
    repeats: int = 5,
    warmup: int = 1,
    decode_tokens: int = 16,
    on_step: Callable[[], None] | None = None,
) -> list[ProfileRow]:
    """`asap profile`: the sample prefilled under every settings, at batch 1 and at `batch`
    (copies of it), measured side by side (see measure()); a record per run and batch size."""
    batches = [build_batch_inputs(loaded.processor, [(prompt, picture)] * size) for size in sorted({1, batch})]
    _check_fits(loaded, int(batches[0]["input_ids"].shape[1]), decode_tokens)
    results = measure(
        loaded, batches, settings, repeats=repeats, warmup=warmup, decode_tokens=decode_tokens, on_step=on_step
    )
    context = conditions(loaded, settings[0].layer, int(batches[0]["input_ids"].shape[1]), repeats, warmup)
    found = loaded.environment
    return [ProfileRow(model=model, **context, **_figures(result, results), environment=found) for result in results]


def _figures(result: Measurement, results: list[Measurement]) -> dict:
    """One measurement's figures, its time beside vanilla's at the same batch size and its
    throughput beside its own at batch 1."""
    # k is None only for a method that prunes nothing: the reference every time is set against
    vanilla = next((other for other in results if other.k is None and other.batch == result.batch), None)
    single = next(other for other in results if (other.method, other.k, other.batch) == (result.method, result.k, 1))
    return {
        "method": result.method,
        "k": result.k,
        "batch": result.batch,
        "visual_tokens": result.visual_tokens,
        "kept_tokens": result.kept_tokens,
        "merged_tokens": result.merged_tokens,
        "tflops": result.tflops,
        "flops_ratio": result.flops_ratio,
        "prompt_flops_ratio": result.prompt_flops_ratio,
        "kv_cache_bytes": result.kv_cache_bytes,
        "peak_memory_bytes": result.peak_memory_bytes,
        "prefill_seconds": result.prefill_median,
        "prefill_seconds_all": result.prefill_seconds,
        "time_ratio": result.prefill_median / vanilla.prefill_median if vanilla else None,
        "images_per_second": result.images_per_second,
        "throughput_ratio": result.images_per_second / single.images_per_second,
        "decode_tokens_per_second": result.decode_tokens_per_second,
    }


def conditions(loaded: Loaded, layer: int, prompt_tokens: int, repeats: int, warmup: int) -> dict:
    """What every figure of a measurement depends on: where it ran and how it was timed."""
    on_gpu = loaded.device.type == "cuda"
    return {
        "random_weights": loaded.random_weights,
        "decoder_layers": loaded.num_layers,
        "decoder_layers_full": loaded.full_layers or loaded.num_layers,
        "device": str(loaded.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "threads": None if on_gpu else torch.get_num_threads(),
        "layer": layer,
        "prompt_tokens": prompt_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "time": "cuda_events" if on_gpu else "cpu_wall",
        "memory": "cuda_max_memory_allocated" if on_gpu else "cpu_allocator_peak",
    }


def how_measured(
    row: ProfileRow, methods: Sequence[type[PruningMethod]], batch: int, gpu_name: str | None
) -> list[str]:
    """The lines under a table of measurements that say what each figure is and how it was got."""
    early = [method.name for method in methods if method.before_llm]
    on_gpu = gpu_name is not None
    where = gpu_name if on_gpu else f"CPU, {row.threads} thread{'' if row.threads == 1 else 's'}"
    time = "CUDA-event time" if on_gpu else "wall time"
    memory = "torch.cuda.max_memory_allocated" if on_gpu else "CPU allocator peak (torch profiler)"
    layer, repeats, warmup = row.layer, row.repeats, row.warmup
    notes = [
        f"{where}, {row.dtype}; {row.prompt_tokens} prompt tokens; pruned after layer {layer - 1} (L={layer})"
        + (f"; {', '.join(early)}: before layer 0 (L=0)." if early else "."),
        "TFLOPs, FLOPs %: paper Eq. 7-8, visual tokens only; prompt %: the same count over every prompt token.",
        (
            f"kept: of {row.visual_tokens} visual tokens; ms: the prefill's {time}, median of {repeats} rounds "
            f"after {warmup} warm-up, methods interleaved; time %: of vanilla's."
        ),
        f"peak MB: {memory} during prefill, above the weights, KV cache included; tok/s: decoding.",
    ]
    notes += built_from_numbers(row.random_weights, row.decoder_layers, row.decoder_layers_full)
    if batch > 1:
        notes.append(
            f"n: samples in one forward (batch {batch}: {batch} copies of the sample); img/s: samples prefilled per second, "
            "vs 1: over batch 1's for the same method; KV, peak and decode tok/s: the whole batch's."
        )
    return notes
