"""asap: Attention-Shift-Aware Pruning of visual tokens for transformers LVLMs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `asapcli.pruned` without importing torch and transformers until it is used (the CLI's
    # start-up does not need them).
    if name == "pruned":
        from .api import pruned

        return pruned
    raise AttributeError(f"module 'asapcli' has no attribute {name!r}")
