"""FLOPs of a real forward of the language model, counted by fvcore, to set beside Eq. 7.

The language model (the pruned decoder, exactly as `asap run` drives it) runs on a sequence of
v visual tokens alone, so that what fvcore counts is what the paper's formula describes: every
linear layer (q, k, v, o projections and the FFN) and scaled-dot-product attention, which
fvcore skips unless given a handle. fvcore counts multiply-accumulates, as the paper does, and
ignores element-wise work (norms, RoPE, activations). The values of the states do not change
the count, so they are random.

A pruning method's own scoring ops (attention mass, received attention) are counted apart.
Selection steps that leave the traced graph (top-k indices, the greedy merge) are not visible
to fvcore's tracer at all.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from ..engine.plans import make_plan
from ..engine.session import PruningSession, attached
from ..engine.settings import PruneSettings
from ..runtime.loading import Loaded

LAYER_OPS = ("linear", "scaled_dot_product_attention")


@dataclass
class CountedFlops:
    per_layer: list[int]  # linear + attention multiply-accumulates of each decoder layer
    other: dict[str, int]  # every other counted op (a method's scoring), by operator name

    @property
    def total(self) -> int:
        return sum(self.per_layer)


def sdpa_flops(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: q.k^T and probabilities.v, each
    batch x query heads x query length x key length x head dim (the paper's 2 v^2 d)."""
    query, key, value = (get_shape(tensor) for tensor in inputs[:3])
    *batch, heads, q_len, head_dim = query
    return math.prod(batch) * heads * q_len * key[-2] * (head_dim + value[-1])


class _VisualOnly(torch.nn.Module):
    """The pruned decoder on a sequence of visual tokens, the whole sequence one image span that
    the `session` attached to it prunes (None: nothing pruned); fvcore traces a module called
    with tensors."""

    def __init__(self, loaded: Loaded, session: PruningSession | None):
        super().__init__()
        self.decoder = loaded.decoder
        self.session = session

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if self.session is not None:  # the decoder is called directly: no input_ids to plan from
            self.session.plan_next(make_plan(self.session.settings, [(0, states.shape[1])]))
        return self.decoder(inputs_embeds=states, use_cache=False).last_hidden_state


def count_flops(loaded: Loaded, visual_tokens: int, settings: PruneSettings | None = None) -> CountedFlops:
    """fvcore's count of one language-model forward over `visual_tokens` tokens, pruned to
    `settings.k` after layer `settings.layer` - 1 when settings are given."""
    session = PruningSession(settings, loaded.text_config) if settings is not None else None
    hidden = loaded.model.config.get_text_config().hidden_size
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, visual_tokens, hidden, generator=generator).to(loaded.device, loaded.model.dtype)
    analysis = FlopCountAnalysis(_VisualOnly(loaded, session).eval(), (states,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flops)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    attach = attached(loaded.model, session) if session is not None else contextlib.nullcontext()
    with warnings.catch_warnings(), torch.no_grad(), attach:
        warnings.simplefilter("ignore")  # the tracer's notes on data-dependent selection
        by_module = analysis.by_module_and_operator()
    layers = [f"decoder.decoder.layers.{index}" for index in range(loaded.num_layers)]
    per_layer = [int(sum(by_module.get(name, Counter()).get(op, 0) for op in LAYER_OPS)) for name in layers]
    other = {op: int(count) for op, count in by_module[""].items() if op not in LAYER_OPS and count}
    return CountedFlops(per_layer=per_layer, other=other)
