"""Prune inside your own code: a context manager around any supported transformers LVLM.

    import asapcli
    with asapcli.pruned(model, method="asap", k=128, layer=2) as pruning:
        out = model.generate(**inputs, max_new_tokens=32)
    print(pruning.report())

Inside the block every forward call of `model` that brings image tokens prunes them: the image
spans are read from that call's `input_ids` (each row of a left-padded batch its own), so
`generate()`, a plain forward and a chat that continues a KV cache all work as they are.
Outside the block the model is what it was: the pruned decoder is installed on entry and taken
out on exit (unless it was there already, as on a model from `asapcli.loading.load`).

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

from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image
from transformers import PreTrainedModel

from .engine import DEFAULT_METHOD
from .engine.block import ImageReport, Pruning, PruningReport, pruned_as
from .engine.settings import PruneSettings
from .runtime.generation import GenerationResult
from .runtime.loading import Loaded

__all__ = ["ImageReport", "Pruning", "PruningReport", "generate", "load", "pruned", "pruned_as"]


@contextmanager
def pruned(
    model: PreTrainedModel, method: str = DEFAULT_METHOD, k: int = 128, layer: int = 2, seed: int = 0, **options
) -> Iterator[Pruning]:
    """Prune the visual tokens of `model` (a transformers LVLM) in every forward call inside the
    block. `options` are the method's own, as the CLI spells them with underscores
    (`lambda_max`, `merge_threshold`, `score_queries`, `score`, `positions`); an option the
    method does not take, or a value out of range, raises asapcli.errors.UsageError."""
    with pruned_as(model, PruneSettings(method, k, layer, seed, **options)) as block:
        yield block


def load(model: str = "demo", **where) -> Loaded:
    """A model as `asap -m MODEL` loads it: a preset name ("demo", the bundled model), a local
    folder or a hub id, with its processor; `where` as the CLI's options: device, dtype,
    device_map, random_weights, layers."""
    from .runtime.loading import load as load_model

    return load_model(model, **where)


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
    seed: int = 0,
    **options,
) -> GenerationResult:
    """One answer about one image (a path or a PIL image), pruned as `asap run` prunes it: k and L
    default to the model's preset's, else 128 and 2. The result holds the text and the figures
    `asap run --json` prints (kept_tokens, visual_tokens, flops_ratio, prefill_seconds, ...)."""
    from .engine.settings import budget_and_layer
    from .runtime import generation
    from .runtime.inputs import build_inputs, load_image, user_message

    k, layer = budget_and_layer(model.preset, k, layer)
    settings = PruneSettings(method, k, layer, seed, **options).for_model(model.num_layers)
    picture = image if isinstance(image, Image.Image) else load_image(image)
    inputs = build_inputs(model.processor, [user_message(prompt, 1)], [picture])
    return generation.generate(model, inputs, settings, max_tokens=max_tokens, temperature=temperature, seed=seed)
