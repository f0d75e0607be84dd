"""Prune inside your own code: a context manager around any supported transformers LVLM.

    import asapcli
    with asapcli.pruned(model, method="asap", k=128, layer=2) as pruning:
        out = model.generate(**inputs, max_new_tokens=32)
    print(pruning.report())

Inside the block every forward call of `model` that brings image tokens prunes them: the image
spans are read from that call's `input_ids` (each row of a left-padded batch its own), so
`generate()`, a plain forward and a chat that continues a KV cache all work as they are.
Outside the block the model is what it was: the pruned decoder is installed on entry and taken
out on exit (unless it was there already, as on a model from `asapcli.load`).

Inside the block the language model's attention runs as PyTorch's SDPA (a model loaded with
eager attention agrees to float rounding, not to the bit) and returns no hidden states or
attention maps (asking for them is an error). Blocks do not nest, and a model inside a block
serves that thread alone (another thread's call of it is an error: give each thread a model of
its own). divprune, pool, vispruner, visionzip and prumerge-plus, which prune before the first
layer, leave a cache shorter than its sequence: a later call cannot continue it (an error, not a
wrong answer).

The CLI answers through the same block (`pruned_as(model, settings)`, with the settings its
options made): a question asked with `asap run` and with this API is pruned the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from PIL import Image
from transformers import PreTrainedModel

from .engine import DEFAULT_METHOD, METHODS
from .engine.cache_state import SequenceCache
from .engine.cost import budget_for, parse_targets
from .engine.methods.hyperparameters import in_keywords
from .engine.session import ImageReport, PromptReport, PruningReport, PruningSession, pruned_as
from .engine.settings import DEFAULT_K, DEFAULT_LAYER, PruneSettings, check_layer_read
from .errors import UsageError
from .runtime import sampling
from .runtime.generation import GenerationResult
from .runtime.loading import Loaded
from .runtime.presets import architecture_of

__all__ = [
    "ImageReport",
    "PromptReport",
    "PruningReport",
    "PruningSession",
    "SequenceCache",
    "generate",
    "load",
    "pruned",
    "pruned_as",
]


def pruned(
    model: PreTrainedModel | Loaded,
    method: str = DEFAULT_METHOD,
    k: int | None = None,
    layer: int | None = None,
    seed: int = 0,
    *,
    flops: float | str | None = None,
    **options,
) -> AbstractContextManager[PruningSession]:
    """Prune the visual tokens of `model` (a transformers LVLM, or what `load` returned) in every
    forward call inside the block. `options` are the method's own, as the CLI spells them with
    underscores (`lambda_max`, `merge_threshold`, `score_queries`, `score`, `positions`,
    `kv_cache`, ...); an option the method does not take, or a value out of range, raises
    asapcli.errors.UsageError here, before the block. With `kv_cache="compact"`, a cache to be
    continued by calls of several tokens is an `asapcli.SequenceCache`. `k` defaults to 128, `layer` (L) to 2; pdrop and sparsevlm, whose
    stages follow the model's depth, take no layer. `flops` (0.25 or "25%") in place of k: the
    largest k whose visual FLOPs stay within that share of vanilla's (Eq. 7-8), as --flops.
    The block can be entered again, each time a fresh one."""
    transformers_model = _transformers_model(model)
    with _in_python():
        _check_layer_read(method, layer)
        k_or_default, layer_or_default = DEFAULT_K if k is None else k, DEFAULT_LAYER if layer is None else layer
        settings = PruneSettings(method, k_or_default, layer_or_default, seed, **options)
        if flops is not None:
            settings = _at_flops(settings, k, flops, transformers_model.config)
    return _Block(transformers_model, settings)


def _at_flops(settings: PruneSettings, k, flops, config) -> PruneSettings:
    """`settings` at the largest k within the FLOPs share `flops` (the API's --flops), on the
    numbers of the model's `config`."""
    if k is not None:
        raise UsageError("give k or flops, not both: flops chooses k")
    if isinstance(flops, bool) or not isinstance(flops, int | float | str):
        raise UsageError(f"flops must be a share of vanilla's FLOPs, 0.25 or '25%', got {flops!r}")
    try:
        architecture = architecture_of(config, "the model")
    except UsageError:
        raise UsageError(
            "flops needs one visual-token count per image; this model's varies with the image (LLaVA-NeXT): give k"
        ) from None
    try:
        targets = parse_targets(flops if isinstance(flops, str) else str(flops))
    except UsageError as error:
        raise UsageError(str(error).replace("--flops", "flops")) from None
    if len(targets) > 1:
        raise UsageError(f"flops takes one share, got {flops!r}")
    (target,) = targets
    try:
        k = budget_for(architecture, settings.method, settings.layer, target) if settings.method.prunes else None
    except UsageError as error:
        raise UsageError(str(error).replace("give --flops", "give flops")) from None
    return settings if k is None else settings.with_budget(k)


class _Block:
    """`with` over pruned_as, made anew at each entry (a contextmanager's generator runs once)."""

    def __init__(self, model: PreTrainedModel, settings: PruneSettings):
        self.model, self.settings = model, settings
        self._open: list[AbstractContextManager[PruningSession]] = []

    def __enter__(self) -> PruningSession:
        block = pruned_as(self.model, self.settings)
        entered = block.__enter__()  # a refusal (a block open already) leaves the open ones as they are
        self._open.append(block)
        return entered

    def __exit__(self, *raised) -> bool | None:
        return self._open.pop().__exit__(*raised)


def _check_layer_read(method, layer: int | None) -> None:
    """A layer given to a method in stages, which would ignore it, refused as the CLI refuses it."""
    if layer is not None and isinstance(method, str) and method in METHODS:
        check_layer_read(METHODS[method], "layer")


def _check_sampling(max_tokens, temperature, top_p, top_k) -> None:
    """What the CLI's --max-tokens, --temperature, --top-p and --top-k refuse, in the keywords' words."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise UsageError(f"max_tokens must be a whole number of at least 1, got {max_tokens!r}")
    try:
        sampling.check(temperature, top_p, top_k)
    except UsageError as error:
        raise UsageError(str(error).replace("top-p", "top_p").replace("top-k", "top_k")) from None


@contextmanager
def _in_python() -> Iterator[None]:
    """The settings' refusals in the caller's words: a keyword (merge_threshold), not the CLI's
    flag (--merge-threshold), which the settings share with the command line."""
    try:
        yield
    except UsageError as error:
        raise UsageError(in_keywords(str(error))) from None


def _transformers_model(model) -> PreTrainedModel:
    if isinstance(model, Loaded):
        return model.model
    if not isinstance(model, PreTrainedModel):
        raise UsageError(
            "pruned() takes a transformers vision-language model (AutoModelForImageTextToText) or what "
            f"asapcli.load() returned, got {type(model).__name__}"
        )
    return model


def load(model: str | os.PathLike = "demo", *, progress: bool = False, **where) -> Loaded:
    """A model as `asap -m MODEL` loads it: a preset name ("demo", the bundled model), a local
    folder or a hub id, with its processor; `where` as the CLI's options: device, dtype,
    device_map, random_weights, layers. `progress`: transformers' bar of the weights it reads (off:
    a script's output is its own)."""
    from transformers.utils import logging as transformers_logging

    from .runtime.loading import load as load_model

    if not isinstance(model, str | os.PathLike):
        raise UsageError(f"load() takes a preset name, a model folder or a hub id, got {type(model).__name__}")
    shown = transformers_logging.is_progress_bar_enabled()
    if not progress:
        transformers_logging.disable_progress_bar()
    try:
        return load_model(os.fspath(model), **where)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def generate(
    model: Loaded,
    image: str | Image.Image,
    prompt: str,
    *,
    method: str = DEFAULT_METHOD,
    k: int | None = None,
    layer: int | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    system: str | None = None,
    flops: float | str | None = None,
    **options,
) -> GenerationResult:
    """One answer about one image (a path or a PIL image), pruned as `asap run` prunes it: k and L
    default to the model's preset's, else 128 and 2 (`flops` in place of k, as `pruned` takes
    it); `system`: a system prompt before the question. The result holds the text and the figures `asap run --json` prints (kept_tokens,
    visual_tokens, flops_ratio, prefill_seconds, ...)."""
    from .engine.settings import budget_and_layer
    from .runtime import generation
    from .runtime.inputs import build_inputs, check_prompt, check_system, check_text, load_image, opening, user_message

    if not isinstance(model, Loaded):
        raise UsageError(
            f"generate() takes what asapcli.load() returned (a model with its processor), got {type(model).__name__}; "
            "for a transformers model of your own, prune its generate() in an asapcli.pruned block"
        )
    if not isinstance(image, str | os.PathLike | Image.Image):
        raise UsageError(f"image must be a path or a PIL image, got {type(image).__name__}")
    if not isinstance(prompt, str):
        raise UsageError(f"prompt must be a string, got {type(prompt).__name__}")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise UsageError(f"system must be a non-empty string, got {system!r}")
    check_prompt(prompt)
    check_text(model.processor, prompt)  # an image placeholder in the text: the CLI refuses it too
    check_system(model.processor, system, generation.context_length(model), "system")
    _check_sampling(max_tokens, temperature, top_p, top_k)
    _check_layer_read(method, layer)
    with _in_python():
        settings = PruneSettings(method, *budget_and_layer(model.preset, k, layer), seed, **options)
        settings = _at_flops(settings, k, flops, model.model.config) if flops is not None else settings
        settings = settings.for_model(model.num_layers)
    picture = image if isinstance(image, Image.Image) else load_image(os.fspath(image))
    inputs = build_inputs(model.processor, [*opening(system), user_message(prompt, 1)], [picture])
    return generation.generate(
        model, inputs, settings, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
