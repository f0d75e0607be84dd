"""What generate() is handed to stream and to stop: the answer's text as it comes, in time
linear in its length, a clean stop between two decoding steps, and the end of the prefill."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class TextStream(BaseStreamer):
    """Receives token ids from generate() and hands on the new text as it comes.

    Each step decodes only a short window: the tokens since the last text handed on, after the
    few before them (so that a tokenizer that writes a word's leading space from its context
    does so as in a whole decode). The window restarts after every piece handed on, so the
    work is linear in the answer, not quadratic. A piece that ends in a partial multi-byte
    character waits for the next token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.prefix_start = 0  # ids[prefix_start:shown_end] were decoded and handed on already
        self.shown_end = 0
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt
            self.seen_prompt = True
            return
        self.ids.extend(value.flatten().tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _show(self, final: bool) -> None:
        shown = self._decode(self.ids[self.prefix_start : self.shown_end])
        text = self._decode(self.ids[self.prefix_start :])
        if not text.startswith(shown) or (text.endswith("\ufffd") and not final):
            return  # wait for the tokens that complete it
        if len(text) > len(shown):
            self.on_text(text[len(shown) :])
            self.prefix_start, self.shown_end = self.shown_end, len(self.ids)


class StopWhen(StoppingCriteria):
    """Ends generation cleanly between two decoding steps once `should_stop()` says so (a Ctrl-C
    inside a forward would leave the KV cache with some layers one token longer than others)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.fired = self.fired or self.should_stop()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class EachStep(StoppingCriteria):
    """Calls `tick` after every decoding step (generate() checks stopping then), for a progress
    bar; never stops anything."""

    def __init__(self, tick: Callable[[], None]):
        self.tick = tick

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.tick()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class FirstToken(StoppingCriteria):
    """Notes when the first token is out (generate() checks stopping after every step): the end
    of the prefill, once the device has finished it (CUDA runs ahead of the host). Never stops
    anything."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.at is None:
            synchronize(input_ids.device)
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def synchronize(device: torch.device) -> None:
    """Wait for the device to finish what it was given (before a timer reads the clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
