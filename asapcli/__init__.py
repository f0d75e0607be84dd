"""asap: Attention-Shift-Aware Pruning of visual tokens for transformers LVLMs."""

__version__ = "0.1.0"
