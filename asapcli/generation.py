"""plan() and generate(): one pruned prefill plus cached decoding, through the model's own
`generate()`, with what it kept and how fast it ran."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import BatchFeature, DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from . import flops
from .engine import METHODS, SCORE_QUERIES, SCORES, PruningPlan, image_spans, make_method
from .errors import AsapError, UsageError

# Where kept tokens sit: at their own positions, or numbered afresh 0..M-1 (before-LLM methods).
POSITIONS = ("original", "renumber")
from .loading import Loaded


@dataclass(frozen=True)
class PruneSettings:
    """What the user asked for; `None` options take the method's own defaults."""

    method: str = "asap"
    k: int = 128
    layer: int = 2
    lambda_max: float | None = None
    merge_threshold: float | None = None
    score_queries: str | None = None
    score: str | None = None
    seed: int = 0
    positions: str = "original"

    def for_method(self, method: str, k: int | None = None) -> PruneSettings:
        """These settings for another method (and budget), as a comparison of several runs them:
        --positions renumber stays with the methods that prune before the language model only."""
        positions = self.positions if METHODS[method].before_llm else "original"
        return replace(self, method=method, k=self.k if k is None else k, positions=positions)

    def check(self, num_layers: int | None = None) -> None:
        """Raise UsageError for a value out of range; the layer's upper bound needs the model."""
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.k < 1:
            raise UsageError(f"k must be at least 1, got {self.k}")
        if self.layer < 1:
            raise UsageError(f"layer must be at least 1 (layers 0..L-1 see every token), got {self.layer}")
        if num_layers is not None and self.layer > num_layers - 1:
            raise UsageError(
                f"layer must be in 1..{num_layers - 1} for this model ({num_layers} layers), got {self.layer}"
            )
        if self.lambda_max is not None and not 0 < self.lambda_max <= 1:
            raise UsageError(f"lambda-max must be in (0, 1], got {self.lambda_max}")
        if self.merge_threshold is not None and not -1 <= self.merge_threshold <= 1:
            raise UsageError(f"merge-threshold is a cosine similarity in [-1, 1], got {self.merge_threshold}")
        if self.score_queries is not None and self.score_queries not in SCORE_QUERIES:
            raise UsageError(f"score-queries must be one of {', '.join(SCORE_QUERIES)}, got {self.score_queries!r}")
        if self.score is not None and self.score not in SCORES:
            raise UsageError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.positions not in POSITIONS:
            raise UsageError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.positions == "renumber" and not METHODS[self.method].before_llm:
            early = ", ".join(name for name, method in METHODS.items() if method.before_llm)
            raise UsageError(
                f"--positions renumber is for methods that prune before the language model ({early}); "
                f"{self.method} keeps original positions, as its reference code does"
            )


def plan(loaded: Loaded, input_ids: torch.Tensor, settings: PruneSettings, since: int = 0) -> PruningPlan:
    """The pruning plan for the image spans of `input_ids` (one sequence) at positions >= `since`."""
    settings.check(loaded.num_layers)
    spans = [span for span in image_spans(input_ids, loaded.image_token_id) if span[0] >= since]
    return pruning_plan(settings, spans)


def batch_plans(loaded: Loaded, input_ids: torch.Tensor, settings: PruneSettings) -> list[PruningPlan]:
    """One plan per row of a (left-padded) batch of sequences (B, N): each row its own spans."""
    return [plan(loaded, row, settings) for row in input_ids]


def pruning_plan(settings: PruneSettings, spans: list[tuple[int, int]]) -> PruningPlan:
    """The plan that prunes `spans` ([start, end) token positions) as `settings` say."""
    method = make_method(
        settings.method,
        lambda_max=settings.lambda_max,
        merge_threshold=settings.merge_threshold,
        score_queries=settings.score_queries,
        score=settings.score,
        seed=settings.seed,
    )
    layer = 0 if method.before_llm else settings.layer
    return PruningPlan(method=method, k=settings.k, layer=layer, spans=spans, renumber=settings.positions == "renumber")


# A decode rate over fewer tokens than this is mostly noise and per-call overhead: not reported.
MIN_DECODE_TOKENS = 8


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    visual_tokens: int
    kept_tokens: int
    merged_tokens: int
    prefill_seconds: float
    decode_tokens_per_second: float | None  # None: fewer than MIN_DECODE_TOKENS decoded
    flops_ratio: float
    layer: int = 0  # L of the plan: 0 for methods that prune before the language model
    kept_positions: list[list[int]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the generated tokens, end-of-text included
    fed_tokens: int = 0  # prompt tokens this call prefilled (the rest came from the cache)
    stopped: bool = False  # cut short by `should_stop`
    cold: bool = False  # the model's first generation: its times include one-time warm-up

    @property
    def pruned(self) -> bool:
        return self.kept_tokens < self.visual_tokens

    def as_json(self) -> dict:
        """The answer and the figures every command's --json reports for it."""
        return {
            "answer": self.text,
            "visual_tokens_before": self.visual_tokens,
            "visual_tokens_after": self.kept_tokens,
            "merged_tokens": self.merged_tokens,
            "flops_ratio": self.flops_ratio,
            "prefill_seconds": self.prefill_seconds,
            "prefill_includes_warmup": self.cold,
            "tokens_per_second": self.decode_tokens_per_second,
            "generated_tokens": self.generated_tokens,
        }


class _StopWhen(StoppingCriteria):
    """Ends generation cleanly between two decoding steps once `should_stop()` says so (a Ctrl-C
    inside a forward would leave the KV cache with some layers one token longer than others)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.fired = self.fired or self.should_stop()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class _Streamer(BaseStreamer):
    """Receives token ids from generate() and hands on the new text as it comes."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.shown = ""
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt
            self.seen_prompt = True
            return
        self.ids.extend(value.flatten().tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # Hold back a partial multi-byte character, and never re-emit what was shown.
        if self.on_text and text.startswith(self.shown) and (final or not text.endswith("\ufffd")):
            if len(text) > len(self.shown):
                self.on_text(text[len(self.shown) :])
            self.shown = text


class _FirstToken(StoppingCriteria):
    """Notes when the first token is out (generate() checks stopping after every step): the end
    of the prefill, once the device has finished it (CUDA runs ahead of the host). Never stops
    anything."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.at is None:
            _synchronize(input_ids.device)
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(
    loaded: Loaded,
    inputs: BatchFeature,
    pruning: PruningPlan | None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    cache: DynamicCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Prefill (pruned by `pruning`, if given) and decode up to `max_tokens` tokens.

    `cache` continues a conversation: `inputs` then holds the whole dialogue and only the tokens
    the cache has not seen are prefilled. `should_stop` is polled after every token.
    """
    inputs = on_model(loaded, inputs)
    streamer = _Streamer(loaded.processor.tokenizer, on_text) if on_text is not None else None
    stop = _StopWhen(should_stop) if should_stop is not None else None
    cached = cache.get_seq_length() if cache is not None else 0
    output, clock = _generate(loaded, inputs, pruning, max_tokens, temperature, seed, streamer, stop, cache)
    prompt_len = inputs["input_ids"].shape[1]
    return _result(
        loaded, inputs["input_ids"][0], output[0, prompt_len:], pruning, clock, cached=cached,
        stopped=bool(stop and stop.fired),
    )  # fmt: skip


def generate_batch(
    loaded: Loaded,
    inputs: BatchFeature,
    plans: list[PruningPlan],
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[GenerationResult]:
    """Several samples as one left-padded batch (`inputs`), one plan per row: prefilled and
    decoded together, a result per row (the times are the batch's)."""
    inputs = on_model(loaded, inputs)
    output, clock = _generate(loaded, inputs, plans, max_tokens, temperature, seed)
    prompt_len = inputs["input_ids"].shape[1]
    eos = loaded.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    results = []
    for row, pruning in enumerate(plans):
        new_ids = output[row, prompt_len:].tolist()
        ends = [index for index, token in enumerate(new_ids) if token in eos]
        new_ids = new_ids[: ends[0] + 1] if ends else new_ids  # what follows is the batch's padding
        padding = int((inputs["attention_mask"][row] == 0).sum()) if "attention_mask" in inputs else 0
        prompt_ids = inputs["input_ids"][row, padding:]
        results.append(_result(loaded, prompt_ids, torch.tensor(new_ids), pruning, clock, padding=padding))
    return results


def context_length(loaded: Loaded) -> int:
    """The most positions the language model was built for (its rotary tables); past them its
    answers degrade into noise without a word."""
    limit = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else 2**31


def _room(loaded: Loaded, prompt_tokens: int, max_tokens: int) -> int:
    """New tokens that fit after the prompt, at most `max_tokens`; a prompt that leaves no room
    for one is refused."""
    limit = context_length(loaded)
    if prompt_tokens >= limit:
        raise AsapError(
            f"the prompt is {prompt_tokens} tokens (image tokens included), more than the model's context of "
            f"{limit}: shorten it"
        )
    return min(max_tokens, limit - prompt_tokens)


@dataclass(frozen=True)
class _Clock:
    started: float
    first_token: float  # the end of the prefill
    finished: float
    cold: bool  # the model's first generation


def _generate(
    loaded: Loaded,
    inputs: BatchFeature,
    pruning: PruningPlan | list[PruningPlan] | None,
    max_tokens: int,
    temperature: float,
    seed: int,
    streamer: _Streamer | None = None,
    stop: _StopWhen | None = None,
    cache: DynamicCache | None = None,
) -> tuple[torch.Tensor, _Clock]:
    """The model's own generate() inside the pruning context: the output ids and its times."""
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    max_tokens = _room(loaded, inputs["input_ids"].shape[1], max_tokens)
    sampling = (
        {"do_sample": False}
        if temperature <= 0
        else {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None}
    )
    torch.manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    first = _FirstToken()
    _synchronize(model.device)
    started = time.perf_counter()
    with torch.inference_mode(), loaded.decoder.pruning(pruning):
        output = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            streamer=streamer,
            past_key_values=cache,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([first, stop] if stop else [first]),
            **sampling,
        )
    _synchronize(model.device)
    finished = time.perf_counter()
    cold, loaded.warm = not loaded.warm, True
    return output, _Clock(started, first.at or finished, finished, cold)


def _result(
    loaded: Loaded,
    prompt_ids: torch.Tensor,
    new_ids: torch.Tensor,
    pruning: PruningPlan | None,
    clock: _Clock,
    cached: int = 0,
    padding: int = 0,
    stopped: bool = False,
) -> GenerationResult:
    """The figures of one sequence: its prompt (`cached` tokens of it came from the cache,
    `padding` batch padding before it left out), its new tokens, its plan."""
    n_new = int(new_ids.numel())
    decoded = n_new - 1  # the first token came with the prefill
    if pruning is None:
        visual = kept = sum(end - start for start, end in image_spans(prompt_ids, loaded.image_token_id))
    else:
        visual, kept = token_counts(pruning)
    _, ratio = token_flops(loaded, visual, kept, pruning.layer if pruning else 0)
    decoding = clock.finished - clock.first_token
    return GenerationResult(
        text=loaded.processor.tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
        prompt_tokens=int(prompt_ids.numel()),
        generated_tokens=n_new,
        visual_tokens=visual,
        kept_tokens=kept,
        merged_tokens=pruning.merged if pruning is not None else 0,
        prefill_seconds=clock.first_token - clock.started,
        decode_tokens_per_second=decoded / decoding if decoded >= MIN_DECODE_TOKENS and decoding > 0 else None,
        flops_ratio=ratio,
        layer=pruning.layer if pruning is not None else 0,
        kept_positions=[(positions - padding).tolist() for positions in pruning.kept] if pruning is not None else [],
        token_ids=new_ids.tolist(),
        fed_tokens=int(prompt_ids.numel()) - cached,
        stopped=stopped,
        cold=clock.cold,
    )


def on_model(loaded: Loaded, inputs: BatchFeature) -> BatchFeature:
    """The inputs on the model's device, images in the model's dtype."""
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    return inputs


def token_counts(pruning: PruningPlan) -> tuple[int, int]:
    """Visual tokens in the plan's spans, and how many of them go past layer L-1."""
    sizes = [end - start for start, end in pruning.spans]
    if not pruning.method.prunes:
        return sum(sizes), sum(sizes)
    return sum(sizes), sum(pruning.method.kept_count(size, pruning.k) for size in sizes)


def token_flops(loaded: Loaded, tokens: int, kept: int, layer: int) -> tuple[float, float]:
    """Theoretical TFLOPs (Eq. 7) of `tokens` tokens of which `kept` go past layer L-1, and the
    ratio to keeping them all (Eq. 8). The paper counts the visual tokens; given the whole
    prompt, the same formula tells what the prefill as a whole should save."""
    text = loaded.model.config.get_text_config()
    stages = flops.single_prune(loaded.num_layers, tokens, kept, layer)
    tflops = flops.schedule_flops(stages, text.hidden_size, text.intermediate_size) / 1e12
    return tflops, flops.flops_ratio(stages, tokens, text.hidden_size, text.intermediate_size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
