"""A multi-turn conversation on one pruned KV cache. Knows nothing of the terminal.

Each turn renders the whole dialogue with the model's own chat template, but prefills only the
tokens the cache has not seen: history is never prefilled again. A turn that brings new images
prunes their spans in its own prefill (the plan names spans past the cached tokens only); the
images of earlier turns stay in the cache as they were pruned then.

The cache must hold exactly the tokens the rendered dialogue starts with. It holds what was fed:
each turn's prompt and all its generated tokens but the last. Re-rendering an answer can
tokenize differently from how it was generated (a leading space, an answer cut at
--max-tokens): then the cache is cut back to the longest common prefix, which only ever drops
text after the last image, and the rest is prefilled. Were the difference to reach into an
image (it cannot with the templates we know), the dialogue is prefilled afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import BatchFeature

from ..engine import cache_state, image_spans
from ..engine.cache_state import SequenceCache
from ..engine.settings import PruneSettings
from ..errors import AsapError
from ..records import ChatStats, ChatTurn, Environment
from .generation import GenerationResult, context_length, generate, kv_cache_bytes
from .inputs import build_inputs, check_prompt, check_system, check_text, opening, user_message
from .loading import Loaded
from .presets import check_tiles

# Processor outputs with one entry per image along dim 0; a turn passes only its new images.
PER_IMAGE_INPUTS = ("pixel_values", "image_sizes")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass
class Turn:
    number: int
    prompt: str
    images: list[str]  # the images this turn brought
    result: GenerationResult
    cached_tokens: int  # the dialogue's tokens the cache continues from (a compact layer 0 holds fewer)

    def record(self, environment: Environment) -> ChatTurn:
        """The turn as --json prints it."""
        return ChatTurn(
            **self.result.figures(),
            turn=self.number,
            prompt=self.prompt,
            images=self.images,
            fed_tokens=self.result.fed_tokens,
            cached_tokens=self.cached_tokens,
            stopped=self.result.stopped,
            environment=environment,
        )


class ChatSession:
    def __init__(
        self,
        loaded: Loaded,
        settings: PruneSettings,
        max_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
        *,
        top_p: float | None = None,
        top_k: int | None = None,
        system: str | None = None,
    ):
        settings = settings.for_model(loaded.num_layers)  # a method before the LLM too: a SequenceCache goes on
        self.loaded = loaded
        self.settings = settings
        self.max_tokens = max_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.seed = seed
        # the dialogue's opening, kept by /forget and /reset
        self.system = check_system(loaded.processor, system, context_length(loaded))
        self.reset()

    def reset(self) -> None:
        """Forget the dialogue, its images (pending ones too) and the cache."""
        self.messages: list[dict] = opening(self.system)
        self.images: list[Image.Image] = []
        self.pending: list[tuple[str, Image.Image]] = []
        self.cache = self._new_cache()
        self.seen: list[int] = []  # the token ids the cache holds, in order
        self.turns: list[Turn] = []

    def _new_cache(self) -> SequenceCache:
        """An empty cache whose length stays the dialogue's, whatever pruning cut from layer 0
        (--kv-cache compact): what the next turn is located by."""
        return SequenceCache(config=self.loaded.model.config.get_text_config())

    def add_image(self, name: str, image: Image.Image) -> None:
        """Queue an image for the next message."""
        self.pending.append((name, image))

    def drop_pending(self) -> list[str]:
        """Forget the images queued for the next message (the dialogue stays); their names."""
        names, self.pending = [name for name, _ in self.pending], []
        return names

    def _too_long(self, tokens: int, queued: int) -> str:
        """What to do about a dialogue that no longer fits the model's context."""
        images = f" and the {queued} queued image(s) (/drop forgets them)" if queued else ""
        forget = " /forget drops the oldest image and the turns up to it," if self.has_image_turn() else ""
        return (
            f"the dialogue no longer fits the model's context ({tokens} tokens with this message{images}, "
            f"{context_length(self.loaded)} at most; pruning does not shorten it, kept tokens keep their "
            f"positions):{forget} /reset starts a new one"
        )

    def has_image_turn(self) -> bool:
        return any(_images_in(message) for message in self.messages)

    def forget_oldest_image(self) -> int:
        """Forget the dialogue up to and including the oldest turn that brought an image (the image
        and the answer to it), to make room in the model's context; the next turn prefills what is
        left afresh. The number of messages forgotten; 0 where no turn brought an image."""
        first = next((i for i, message in enumerate(self.messages) if _images_in(message)), None)
        if first is None:
            return 0
        start, cut = len(opening(self.system)), first + 2  # the system prompt stays; the answer goes with its turn
        forgotten = sum(_images_in(message) for message in self.messages[start:cut])
        self.messages, self.images = self.messages[:start] + self.messages[cut:], self.images[forgotten:]
        self.cache = self._new_cache()
        self.seen = []
        return cut - start

    def set_k(self, k: int) -> None:
        """The budget for images from the next message on, checked as -k is."""
        settings = self.settings.with_budget(k)
        check_tiles(self.loaded.name, [settings])  # a [CLS] method's k per tile on LLaVA-NeXT
        self.settings = settings

    def ask(
        self,
        text: str,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Turn:
        """One user turn: prefill what is new (pruning new images), stream the answer."""
        check_prompt(text)
        check_text(self.loaded.processor, text)
        new_images = [image for _, image in self.pending]
        messages = self.messages + [user_message(text, len(new_images))]
        images = self.images + new_images
        features = build_inputs(self.loaded.processor, messages, images)
        ids = features["input_ids"][0]
        if ids.numel() >= context_length(self.loaded):
            raise AsapError(self._too_long(ids.numel(), len(new_images)))
        saved = self._saved()
        try:
            common = self._reuse_cache(ids.tolist())
            cached_images = len(image_spans(ids[:common], self.loaded.image_token_id))  # none after /forget
            result = generate(
                self.loaded,
                _with_images_from(features, cached_images),
                self.settings,  # prunes the images the cache has not seen: those in the prefilled tokens
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self.seed,
                on_text=on_text,
                cache=self.cache,
                should_stop=should_stop,
            )
        except BaseException:
            self._restore(*saved)
            raise
        # The last generated token was never fed to the model: the cache ends before it.
        self.seen = ids.tolist() + result.token_ids[:-1]
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": result.text}]}]
        self.images = images
        turn = Turn(len(self.turns) + 1, text, [name for name, _ in self.pending], result, self.cache.get_seq_length())
        self.pending = []
        self.turns.append(turn)
        return turn

    def _saved(self) -> tuple:
        """What `_restore` puts back after a turn that failed anywhere: the cache's tensors are
        never changed in place (crop slices, update concatenates, a compact cut gathers anew), so
        keeping them is enough."""
        layers = [dict(vars(layer)) for layer in self.cache.layers]
        return self.cache, layers, self.seen, cache_state.of(self.cache).copy()

    def _restore(
        self, cache: SequenceCache, layers: list[dict], seen: list[int], state: cache_state.CacheState
    ) -> None:
        """The cache as a failed turn found it, with the pruning state it carried."""
        self.cache, self.seen = cache, seen
        setattr(cache, cache_state.ATTRIBUTE, state)
        del self.cache.layers[len(layers) :]  # layers a cache built lazily may have added
        for layer, attributes in zip(self.cache.layers, layers):
            vars(layer).clear()
            vars(layer).update(attributes)

    def _reuse_cache(self, ids: list[int]) -> int:
        """Cut the cache back to its longest common prefix with `ids` (always leaving at least one
        token to prefill) and return how many tokens it keeps."""
        common = 0
        for cached, new in zip(self.seen, ids):
            if cached != new:
                break
            common += 1
        common = min(common, len(ids) - 1)
        drop = len(self.seen) - common
        if drop == 0:
            return common
        last_image_end = max(
            (end for _, end in image_spans(torch.tensor(self.seen), self.loaded.image_token_id)), default=0
        )
        if common < last_image_end:  # the cached images no longer match: start over
            self.cache = self._new_cache()
            self.seen = []
            return 0
        # Only text after the last image goes, and text is never pruned: every layer drops as many.
        for layer in self.cache.layers:
            layer.crop(-drop)
        self.seen = self.seen[:common]
        return common

    def _layer(self) -> int:
        """L as the last turn that pruned an image pruned it, as run reports it (a method in stages
        starts where its schedule does, whatever --layer says); before one, the settings'."""
        pruned = (turn.result.layer for turn in reversed(self.turns) if turn.result.steps)
        return next(pruned, self.settings.first_layer)

    def stats(self) -> ChatStats:
        lengths = [layer.get_seq_length() for layer in self.cache.layers]
        last = self.turns[-1].result if self.turns else None
        vanilla = sum(turn.result.flops.full for turn in self.turns)  # Eq. 7 of the images each turn brought
        pruned = sum(turn.result.flops.pruned for turn in self.turns)
        return ChatStats(
            turns=len(self.turns),
            images=len(self.images),
            pending_images=len(self.pending),
            k=self.settings.k,
            method=self.settings.method.name,
            layer=self._layer(),
            cache_tokens_per_layer=lengths,
            kv_cache_bytes=kv_cache_bytes(self.cache),
            tflops_vanilla=vanilla,
            tflops=pruned,
            tflops_saved=vanilla - pruned,
            last_prefill_seconds=last.prefill_seconds if last else None,
            last_decode_tokens_per_second=last.decode_tokens_per_second if last else None,
            environment=self.loaded.environment,
        )


def _with_images_from(features: BatchFeature, first: int) -> BatchFeature:
    """The processed dialogue with the per-image inputs of images `first`.. only: earlier images
    are in the cache already, and the model places image features by count."""
    if first == 0:
        return features
    unknown = [key for key in features if key not in TEXT_INPUTS + PER_IMAGE_INPUTS]
    if unknown:
        raise AsapError(f"chat cannot split this model's image inputs per image yet ({', '.join(unknown)})")
    kept = BatchFeature({key: features[key] for key in TEXT_INPUTS if key in features})
    for key in PER_IMAGE_INPUTS:
        if key in features and features[key].shape[0] > first:
            kept[key] = features[key][first:]
    return kept


def _images_in(message: dict) -> int:
    content = message["content"]
    return sum(part.get("type") == "image" for part in content) if isinstance(content, list) else 0
