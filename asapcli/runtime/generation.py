"""generate(): one pruned prefill plus cached decoding, through the model's own `generate()`
inside the public API's block (asapcli.pruned), with what it kept and how fast it ran
(GenerationResult)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import BatchFeature, DynamicCache, StoppingCriteriaList

from ..engine import cost, image_spans
from ..engine.session import PromptReport, pruned_as
from ..engine.settings import PruneSettings
from ..errors import AsapError
from . import sampling, streaming
from .loading import Loaded
from .streaming import EachStep, FirstToken, StopWhen, TextStream

# A decode rate over fewer tokens than this is mostly noise and per-call overhead: not reported.
MIN_DECODE_TOKENS = 8

# Why an answer ended: the model ended it, or it was cut (by --max-tokens, by the end of the
# model's context, by the user).
ENDINGS = ("end", "max-tokens", "context", "stopped")


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_tokens_per_second: float | None  # None: fewer than MIN_DECODE_TOKENS decoded
    pruning: PromptReport  # what its prefill pruned, in the prompt's own positions
    flops: cost.VisualFlops  # Eq. 7 of the prompt's visual tokens, as pruned and whole
    token_ids: list[int] = field(default_factory=list)  # the generated tokens, end-of-text included
    fed_tokens: int = 0  # prompt tokens this call prefilled (the rest came from the cache)
    stopped: bool = False  # cut short by `should_stop`
    ended: str = "end"  # one of ENDINGS
    cold: bool = False  # the model's first generation: its times include one-time warm-up
    timed_on: str = ""  # where its times were taken (Environment.timed_on): one sample each, no spread

    # The prompt's pruning, read from its one report.
    visual_tokens = property(lambda self: self.pruning.visual_tokens)
    kept_tokens = property(lambda self: self.pruning.kept_tokens)
    merged_tokens = property(lambda self: self.pruning.merged_tokens)
    layer = property(lambda self: self.pruning.layer)  # L as pruned: 0 for methods that prune before the LLM
    steps = property(lambda self: list(self.pruning.steps))  # the prompt's visual schedule, as Eq. 7 counts it
    k_unmet = property(lambda self: self.pruning.k_unmet)  # why it kept another count than k asks; None: it did not
    flops_ratio = property(lambda self: self.flops.ratio)  # Eq. 8

    @property
    def pruned(self) -> bool:
        return self.kept_tokens < self.visual_tokens

    def figures(self) -> dict:
        """The fields of records.AnswerFigures, which every answering record carries."""
        return {
            "answer": self.text,
            "visual_tokens": self.visual_tokens,
            "kept_tokens": self.kept_tokens,
            "merged_tokens": self.merged_tokens,
            "k_unmet": self.k_unmet,
            "flops_ratio": self.flops_ratio,
            "prefill_seconds": self.prefill_seconds,
            "prefill_includes_warmup": self.cold,
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "generated_tokens": self.generated_tokens,
            "ended": self.ended,
        }

    @property
    def kept_positions(self) -> list[list[int]]:
        """The positions kept of each image the prompt's prefill pruned."""
        return [span.kept.tolist() for span in self.pruning.spans]


def generate(
    loaded: Loaded,
    inputs: BatchFeature,
    settings: PruneSettings,
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    cache: DynamicCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Prefill (its new images pruned as `settings` say) and decode up to `max_tokens` tokens.

    `cache` continues a conversation: `inputs` then holds the whole dialogue and only the tokens
    the cache has not seen are prefilled. `should_stop` is polled after every token.
    """
    inputs = to_device(loaded, inputs)
    streamer = TextStream(loaded.processor.tokenizer, on_text) if on_text is not None else None
    stop = StopWhen(should_stop) if should_stop is not None else None
    cached = cache.get_seq_length() if cache is not None else 0
    output, clock, prompts = _generate(
        loaded, inputs, settings, max_tokens=max_tokens, options=sampling.generate_options(temperature, top_p, top_k),
        seed=seed, streamer=streamer, stop=stop, cache=cache,
    )  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    return _result(
        loaded, prompt_ids=inputs["input_ids"][0], new_ids=output[0, prompt_len:], report=prompts and prompts[0],
        clock=clock, cached=cached, stopped=bool(stop and stop.fired), max_tokens=max_tokens,
    )  # fmt: skip


def generate_batch(
    loaded: Loaded,
    inputs: BatchFeature,
    settings: PruneSettings,
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    options: dict | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[GenerationResult]:
    """Several samples as one left-padded batch (`inputs`), each row pruned on its own: prefilled
    and decoded together, a result per row (the times are the batch's). `options`: generate()'s
    own sampling options in place of those `temperature`, `top_p` and `top_k` make (lmms-eval
    passes its task's);
    `on_step` is called after each decoding step (at most `max_tokens`: a progress bar's)."""
    inputs = to_device(loaded, inputs)
    options = options if options is not None else sampling.generate_options(temperature, top_p, top_k)
    stop = EachStep(on_step) if on_step is not None else None
    output, clock, prompts = _generate(
        loaded, inputs, settings, max_tokens=max_tokens, options=options, seed=seed, stop=stop
    )
    prompts = prompts or [None] * output.shape[0]
    prompt_len = inputs["input_ids"].shape[1]
    eos = _end_tokens(loaded)
    results = []
    for row, report in enumerate(prompts):
        new_ids = output[row, prompt_len:].tolist()
        ends = [index for index, token in enumerate(new_ids) if token in eos]
        new_ids = new_ids[: ends[0] + 1] if ends else new_ids  # what follows is the batch's padding
        padding = int((inputs["attention_mask"][row] == 0).sum()) if "attention_mask" in inputs else 0
        prompt_ids, new_ids = inputs["input_ids"][row, padding:], torch.tensor(new_ids)
        result = _result(
            loaded,
            prompt_ids=prompt_ids,
            new_ids=new_ids,
            report=report,
            clock=clock,
            padding=padding,
            max_tokens=max_tokens,
        )
        results.append(result)
    return results


def context_length(loaded: Loaded) -> int:
    """The most positions the language model was built for (its rotary tables); past them its
    answers degrade into noise without a word."""
    limit = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else 2**31


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by the key and value tensors of every layer of the cache."""
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (layer.keys, layer.values)
        if tensor is not None
    )


def _room(loaded: Loaded, prompt_tokens: int, max_tokens: int) -> int:
    """New tokens that fit after the prompt, at most `max_tokens`; a prompt that leaves no room
    for one is refused."""
    limit = context_length(loaded)
    if prompt_tokens >= limit:
        raise AsapError(
            f"the prompt is {prompt_tokens} tokens (image tokens included): the model's context of {limit} "
            "leaves no room for an answer; shorten it"
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
    settings: PruneSettings,
    *,
    max_tokens: int,
    options: dict,
    seed: int,
    streamer: TextStream | None = None,
    stop: StopWhen | EachStep | None = None,
    cache: DynamicCache | None = None,
) -> tuple[torch.Tensor, _Clock, list[PromptReport] | None]:
    """The model's own generate() inside the API's pruning block: the output ids, its times and
    what the prefill pruned (one report per row; None when the prompt brought no image)."""
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    max_tokens = _room(loaded, inputs["input_ids"].shape[1], max_tokens)
    torch.manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    first = FirstToken()
    streaming.synchronize(model.device)
    started = time.perf_counter()
    with torch.inference_mode(), pruned_as(model, settings) as pruning:
        output = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            streamer=streamer,
            past_key_values=cache,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([first, stop] if stop else [first]),
            **options,
        )
    streaming.synchronize(model.device)
    finished = time.perf_counter()
    cold, loaded.warm = not loaded.warm, True
    prefill = pruning.prefills[0] if pruning.prefills else None
    prompts = [prefill.prompt(row) for row in range(len(prefill.plans))] if prefill is not None else None
    return output, _Clock(started, first.at or finished, finished, cold), prompts


def _result(
    loaded: Loaded,
    *,
    prompt_ids: torch.Tensor,
    new_ids: torch.Tensor,
    report: PromptReport | None,
    clock: _Clock,
    cached: int = 0,
    padding: int = 0,
    stopped: bool = False,
    max_tokens: int = 0,
) -> GenerationResult:
    """The figures of one sequence: its prompt (`cached` tokens of it came from the cache,
    `padding` batch padding before it left out), its new tokens, what its prefill pruned;
    `max_tokens` as asked."""
    n_new = int(new_ids.numel())
    decoded = n_new - 1  # the first token came with the prefill
    if report is None:  # no image among the tokens prefilled (those of the cache were counted before)
        visual = sum(end - start for start, end in image_spans(prompt_ids[cached:], loaded.image_token_id))
        report = PromptReport(0, (), (), visual, visual, 0, (), 0, None)
    decoding = clock.finished - clock.first_token
    return GenerationResult(
        text=loaded.processor.tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
        prompt_tokens=int(prompt_ids.numel()),
        generated_tokens=n_new,
        prefill_seconds=clock.first_token - clock.started,
        decode_tokens_per_second=decoded / decoding if decoded >= MIN_DECODE_TOKENS and decoding > 0 else None,
        pruning=report,
        flops=report.tflops(loaded.text_config),
        token_ids=new_ids.tolist(),
        fed_tokens=int(prompt_ids.numel()) - cached,
        stopped=stopped,
        ended=_ending(loaded, int(prompt_ids.numel()) + padding, new_ids, max_tokens, stopped),
        cold=clock.cold,
        timed_on=loaded.environment.timed_on,
    )


def _ending(loaded: Loaded, prompt_tokens: int, new_ids: torch.Tensor, max_tokens: int, stopped: bool) -> str:
    """Which of ENDINGS ended an answer of `new_ids` after a (padded) prompt of `prompt_tokens`."""
    if stopped:
        return "stopped"
    if new_ids.numel() and int(new_ids[-1]) in _end_tokens(loaded):
        return "end"
    if new_ids.numel() >= max_tokens:
        return "max-tokens"
    return "context" if prompt_tokens + new_ids.numel() >= context_length(loaded) else "end"


def _end_tokens(loaded: Loaded) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def to_device(loaded: Loaded, inputs: BatchFeature) -> BatchFeature:
    """The inputs on the model's device, images in the model's dtype."""
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    return inputs
