"""The pruning engine: install the pruned decoder into a transformers LVLM, find image spans,
plan a pruning prefill. Knows nothing of the CLI.

The method registry and its hyperparameters import without torch (the CLI lists them in its
help, which must start in a blink); everything that computes is imported on first use."""

from __future__ import annotations

import importlib

from .methods import (
    DEFAULT_METHOD,
    HYPERPARAMETERS,
    KV_CACHES,
    METHODS,
    POSITIONS,
    REFERENCE,
    SCORE_QUERIES,
    SCORES,
    Hyperparameter,
    PruningMethod,
)

# name -> the submodule that defines it, imported (with torch and transformers) when first asked for.
_COMPUTING = {
    "PrunedDecoder": "decoder",
    "PruningPlan": "plans",
    "SpanRecord": "prune_pass",
    "UnsupportedModel": "wiring",
    "check_supported": "wiring",
    "image_spans": "plans",
    "install": "wiring",
    "uninstall": "wiring",
}

__all__ = [
    "DEFAULT_METHOD",
    "HYPERPARAMETERS",
    "KV_CACHES",
    "METHODS",
    "POSITIONS",
    "REFERENCE",
    "SCORES",
    "SCORE_QUERIES",
    "Hyperparameter",
    "PrunedDecoder",
    "PruningMethod",
    "PruningPlan",
    "SpanRecord",
    "UnsupportedModel",
    "check_supported",
    "image_spans",
    "install",
    "make_method",
    "uninstall",
]


def __getattr__(name: str):
    if name in _COMPUTING:
        return getattr(importlib.import_module(f".{_COMPUTING[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_method(name: str, **options) -> PruningMethod:
    """A method instance from its registry name, with the options it understands, unchecked (a
    plan made by hand; PruneSettings makes the checked ones)."""
    cls = METHODS[name]
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(**{key: value for key, value in options.items() if key in fields and value is not None})
