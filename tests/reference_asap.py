"""An independent, deliberately naive reference of ASAP (arXiv 2603.14549, Section 4) for tests.

Written from the paper and from DESIGN.md section 3 only; it shares no code with asapcli/engine.
Everything is explicit and dense: a Llama/Qwen2-style decoder re-implemented from the weights
(RMSNorm, default RoPE, GQA by repeating key/value heads, eager attention with a full additive
N x N mask and softmax, SiLU-gated MLP, final norm, lm_head), computed in float64. Only the vision
tower and projector are the model's own (`get_image_features`).

The readings it follows (DESIGN.md section 3):
- layers are numbered from 0; pruning happens between layer L-1 and layer L; layers 0..L-1 see
  every token;
- saliency, per layer 0..L-1, from that layer's own post-RoPE q/k:
  s_j = mean over heads of sum_{i in I} q_i . k_j * scale, for j in the span I;
  s_hat = (s - min) / (max - min + 1e-6) over the span;
- SG-BiMask in every layer 0..L-1 with that layer's s_hat: for i < j both in the same pruned span
  the additive mask is ln(max(lambda_max * s_hat_j, 1e-6)); everything else causal;
- importance at layer L-1: softmax probability (over all keys, under that layer's mask) that each
  span key receives from the scoring rows, averaged over heads and rows ('contribution' multiplies
  by the per-head L2 norm of the key's value vector first); rows: 'last' = last token, 'text' =
  every position after the span (the last token if none), 'all' = span start .. end;
- top-k by importance; consolidation (Eq. 6) among the k kept tokens on the layer-(L-1) outputs,
  by descending s_hat (ties: lower position first), greedy anchors, threshold `> t`, a budget of
  span_size - k absorptions used up anchor by anchor; anchor state = s_hat-weighted convex
  combination (plain mean if all weights are zero); refill the a absorbed slots with the top-a
  pruned tokens by raw mass s_j; kept tokens keep their original RoPE positions;
- layers >= L: plain causal attention over text + kept tokens;
- a span with k >= its size is not pruned and gets no SG-BiMask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE = torch.float64
EPS_MINMAX = 1e-6
EPS_LAMBDA = 1e-6


# ----------------------------------------------------------------------------- weights


def _param(module, name):
    value = getattr(module, name, None)
    return None if value is None else value.detach().to(DTYPE).clone()


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


class ReferenceLM:
    """The text model of an LVLM, re-implemented from its weights."""

    def __init__(self, model):
        self.model = model
        config = model.config
        text = config.text_config
        self.image_token_id = config.image_token_id
        self.hidden = text.hidden_size
        self.heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(text, "head_dim", None) or self.hidden // self.heads
        self.eps = text.rms_norm_eps
        rope = getattr(text, "rope_parameters", None) or {}
        self.theta = float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)))
        assert rope.get("rope_type", "default") == "default", "the reference only knows default RoPE"
        self.scale = self.head_dim**-0.5

        # The language model's own modules, read for their weights only.
        lm = model.model.language_model
        self.layers = []
        for layer in lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                LayerWeights(
                    ln1=_param(layer.input_layernorm, "weight"),
                    ln2=_param(layer.post_attention_layernorm, "weight"),
                    wq=_param(attn.q_proj, "weight"),
                    bq=_param(attn.q_proj, "bias"),
                    wk=_param(attn.k_proj, "weight"),
                    bk=_param(attn.k_proj, "bias"),
                    wv=_param(attn.v_proj, "weight"),
                    bv=_param(attn.v_proj, "bias"),
                    wo=_param(attn.o_proj, "weight"),
                    bo=_param(attn.o_proj, "bias"),
                    w_gate=_param(mlp.gate_proj, "weight"),
                    w_up=_param(mlp.up_proj, "weight"),
                    w_down=_param(mlp.down_proj, "weight"),
                )
            )
        self.final_norm = _param(lm.norm, "weight")
        self.lm_head = _param(model.lm_head, "weight")
        self.lm_head_bias = _param(model.lm_head, "bias")

    # ------------------------------------------------------------------------- pieces

    def embed(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embeddings (N, d) in float64, input ids (N,)) for batch row 0 of `inputs`."""
        ids = inputs["input_ids"]
        assert ids.shape[0] == 1, "the reference handles one sequence"
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(ids)[0].clone()
            features = self.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            features = torch.cat(list(features), dim=0).reshape(-1, embeds.shape[-1])
        where = ids[0] == self.image_token_id
        assert int(where.sum()) == features.shape[0], "one image feature per image token"
        embeds[where] = features.to(embeds.dtype)
        return embeds.to(DTYPE), ids[0]

    def rms_norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = torch.arange(0, self.head_dim, 2, dtype=DTYPE) / self.head_dim
        inv_freq = 1.0 / (self.theta**half)
        angles = positions.to(DTYPE)[:, None] * inv_freq[None, :]  # (N, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (N, hd)
        return angles.cos(), angles.sin()

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def _linear(x, w, b):
        y = x @ w.T
        return y if b is None else y + b

    def qkv(self, layer: LayerWeights, h: torch.Tensor, positions: torch.Tensor):
        """Post-RoPE q, k and v, (heads, N, head_dim) each, k and v repeated to all query heads."""
        n = h.shape[0]
        x = self.rms_norm(h, layer.ln1)
        q = self._linear(x, layer.wq, layer.bq).view(n, self.heads, self.head_dim).transpose(0, 1)
        k = self._linear(x, layer.wk, layer.bk).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        v = self._linear(x, layer.wv, layer.bv).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        cos, sin = self.rope(positions)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        groups = self.heads // self.kv_heads
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
        return q, k, v

    def finish_layer(self, layer: LayerWeights, h, probs, v):
        """The rest of a decoder layer once the attention probabilities (heads, N, N) are known."""
        n = h.shape[0]
        attn = (probs @ v).transpose(0, 1).reshape(n, self.heads * self.head_dim)
        h = h + self._linear(attn, layer.wo, layer.bo)
        x = self.rms_norm(h, layer.ln2)
        gate = x @ layer.w_gate.T
        up = x @ layer.w_up.T
        return h + (torch.nn.functional.silu(gate) * up) @ layer.w_down.T

    @staticmethod
    def causal_mask(n: int) -> torch.Tensor:
        mask = torch.zeros(n, n, dtype=DTYPE)
        return mask.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))

    def logits(self, h):
        y = self.rms_norm(h, self.final_norm) @ self.lm_head.T
        return y if self.lm_head_bias is None else y + self.lm_head_bias

    # ------------------------------------------------------------------------- forwards

    def vanilla(self, inputs) -> torch.Tensor:
        """Logits (N, vocab) of the unpruned sequence."""
        h, _ = self.embed(inputs)
        n = h.shape[0]
        positions = torch.arange(n)
        mask = self.causal_mask(n)
        for layer in self.layers:
            q, k, v = self.qkv(layer, h, positions)
            probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale + mask, dim=-1)
            h = self.finish_layer(layer, h, probs, v)
        return self.logits(h)

    def pruned(
        self,
        inputs,
        method: str,
        k: int,
        layer: int,
        lambda_max: float = 1.0,
        merge_threshold: float = 0.9,
        score_queries: str = "last",
        score: str = "attention",
        embedded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Result:
        """ASAP / its ablation / FastV on one sequence; `embedded` = a saved `embed(inputs)`."""
        assert method in ("asap", "asap-bimask-only", "fastv")
        assert score_queries in ("last", "text", "all") and score in ("attention", "contribution")
        assert 1 <= layer <= len(self.layers) - 1
        h, ids = self.embed(inputs) if embedded is None else embedded
        n = h.shape[0]
        positions = torch.arange(n)
        spans = image_spans(ids, self.image_token_id)
        pruned_spans = [span for span in spans if k < span[1] - span[0]]
        bimask = method in ("asap", "asap-bimask-only")

        # Layers 0..L-1 over the full sequence.
        for index in range(layer):
            weights = self.layers[index]
            q, key, v = self.qkv(weights, h, positions)
            logits = q @ key.transpose(-1, -2) * self.scale  # W, (heads, N, N)
            mask = self.causal_mask(n)
            mass, norm_mass = {}, {}
            for start, end in pruned_spans:
                # Eq. 2 read per head, then averaged over heads: s_j = sum_{i in I} W_ij.
                s = logits[:, start:end, start:end].sum(dim=1).mean(dim=0)
                s_hat = (s - s.min()) / (s.max() - s.min() + EPS_MINMAX)  # Eq. 3
                mass[start], norm_mass[start] = s, s_hat
                if bimask:  # Eq. 4
                    penalty = torch.log(torch.clamp(lambda_max * s_hat, min=EPS_LAMBDA))
                    block = penalty[None, :].expand(end - start, end - start)
                    upper = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
                    mask[start:end, start:end] = torch.where(upper, block, mask[start:end, start:end])
            probs = torch.softmax(logits + mask, dim=-1)  # Eq. 5
            h = self.finish_layer(weights, h, probs, v)
        # h: output of layer L-1; probs, v, mass, norm_mass: those of layer L-1.

        kept_spans: list[torch.Tensor] = []
        merged = 0
        new_state = {}  # position -> state entering layer L, for merged anchors
        drop = torch.zeros(n, dtype=torch.bool)
        debug = {}
        for start, end in pruned_spans:
            size = end - start
            if score_queries == "last":
                rows = torch.tensor([n - 1])
            elif score_queries == "text":
                rows = torch.arange(end, n) if end < n else torch.tensor([n - 1])
            else:
                rows = torch.arange(start, n)
            received = probs[:, rows, start:end]  # (heads, rows, span)
            if score == "contribution":
                received = received * v[:, start:end, :].norm(dim=-1)[:, None, :]
            importance = received.mean(dim=(0, 1))  # (span,)
            order = _descending(importance)
            debug[start] = {"importance": importance, "mass": mass.get(start), "s_hat": norm_mass.get(start)}
            top = order[:k]  # span-relative indices
            if method in ("fastv", "asap-bimask-only"):
                keep = sorted(int(i) for i in top)
            else:
                keep, absorbed, states, sources, refill = consolidate(
                    top, h[start:end], norm_mass[start], mass[start], size - k, merge_threshold
                )
                debug[start].update(top=sorted(int(i) for i in top), sources=sources, refill=refill)
                merged += absorbed
                for rel, state in states.items():
                    new_state[start + rel] = state
            kept_abs = torch.tensor(keep, dtype=torch.long) + start
            assert len(keep) == k
            kept_spans.append(kept_abs)
            span_drop = torch.ones(size, dtype=torch.bool)
            span_drop[torch.tensor(keep, dtype=torch.long)] = False
            drop[start:end] = span_drop

        h = h.clone()
        for position, state in new_state.items():
            h[position] = state
        survivors = torch.nonzero(~drop).squeeze(-1)
        h = h[survivors]
        entering = h.clone()

        # Layers L.. over text + kept tokens, plain causal, original positions.
        m = h.shape[0]
        mask = self.causal_mask(m)
        for weights in self.layers[layer:]:
            q, key, v = self.qkv(weights, h, survivors)
            probs = torch.softmax(q @ key.transpose(-1, -2) * self.scale + mask, dim=-1)
            h = self.finish_layer(weights, h, probs, v)
        return Result(
            spans=spans,
            kept=kept_spans,
            merged=merged,
            positions=survivors,
            entering=entering,
            logits=self.logits(h),
            debug=debug,
        )


@dataclass
class Result:
    spans: list[tuple[int, int]]  # every image span, [start, end)
    kept: list[torch.Tensor]  # per pruned span, absolute kept positions, ascending
    merged: int  # tokens absorbed by consolidation (and refilled), all spans
    positions: torch.Tensor  # (M,) original positions of the pruned sequence
    entering: torch.Tensor  # (M, d) hidden states entering layer L
    logits: torch.Tensor  # (M, vocab)
    debug: dict  # span start -> importance, raw mass and s_hat of layer L-1; asap: top, sources, refill (span-relative)


def image_spans(ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """Maximal runs of image tokens, [start, end)."""
    spans, start = [], None
    flags = (ids == image_token_id).tolist() + [False]
    for position, flag in enumerate(flags):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append((start, position))
            start = None
    return spans


def _descending(values: torch.Tensor) -> list[int]:
    """Indices by descending value, ties broken by lower index."""
    listed = values.tolist()
    return sorted(range(len(listed)), key=lambda i: (-listed[i], i))


def consolidate(top, states, s_hat, s, budget: int, threshold: float):
    """Eq. 6 and the budget reallocation over one span (all indices span-relative).

    top: the k selected indices; states: (span, d) layer-(L-1) outputs; s_hat, s: normalised and
    raw masses of layer L-1; budget: how many tokens may be absorbed in all (span - k).
    Returns (kept indices ascending, number absorbed, {anchor index: merged state}, {anchor
    index: the indices it absorbed}, the refilled indices)."""
    top = [int(i) for i in top]
    saliency, raw = s_hat.tolist(), s.tolist()
    visit = sorted(top, key=lambda i: (-saliency[i], i))
    unit = states[visit] / states[visit].norm(dim=-1, keepdim=True)
    similarity = (unit @ unit.T).tolist()
    absorbed: set[int] = set()
    sources: dict[int, list[int]] = {}
    left = budget
    for a_rank, anchor in enumerate(visit):
        if anchor in absorbed:
            continue
        for m_rank in range(a_rank + 1, len(visit)):
            if left <= 0:
                break
            member = visit[m_rank]
            if member in absorbed:
                continue
            if similarity[a_rank][m_rank] > threshold:
                absorbed.add(member)
                sources.setdefault(anchor, []).append(member)
                left -= 1
    merged_states = {}
    for anchor, members in sources.items():
        group = [anchor] + members
        weights = s_hat[group]
        if float(weights.sum()) == 0.0:
            merged_states[anchor] = states[group].mean(dim=0)
        else:
            merged_states[anchor] = (weights[:, None] * states[group]).sum(dim=0) / weights.sum()
    a = len(absorbed)
    pool = [i for i in range(states.shape[0]) if i not in set(top)]
    refill = sorted(pool, key=lambda i: (-raw[i], i))[:a]
    keep = sorted((set(top) - absorbed) | set(refill))
    return keep, a, merged_states, sources, refill
