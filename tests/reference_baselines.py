"""Pure-tensor references of five baselines' official token selection / merging, for tests.

Each function takes exactly the tensors the authors' code consumes at the point where it selects
(or merges) visual tokens and returns what that code hands on: kept indices in the order the
official code feeds them to the language model, and the merged / new feature tensors where the
method merges. No model, no transformers: plain torch, any floating dtype (float64 works; the
computation stays in the input dtype unless the official code casts, in which case the same cast
is made here).

Written from a reading of the official code at these commits (line numbers refer to them):

- VisPruner: Theia-4869/VisPruner @ aefa01adc7c7ce6334e880c88225e90cede760d1
  (llava/model/llava_arch.py, llava/model/multimodal_encoder/clip_encoder.py)
- VisionZip: dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02
  (visionzip/clip_encoder.py, visionzip/utils.py, visionzip/main.py, README.md)
- LLaVA-PruMerge+: 42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a
  (llava/model/multimodal_encoder/clip_encoder.py)
- PyramidDrop: Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a
  (llava/model/modeling_llama_pdrop.py)
- SparseVLM v1.5: Gumpest/SparseVLMs, branch v1.5 @ 734d9003879689713a132b83297dfad060a5c9af
  (llava/model/language_model/modelling_sparse_llama.py, score.py, utils.py)

They were checked equal to the official functions themselves (run out of tree with their heavy
imports stubbed) on random inputs; no official code is copied here.

Ties. The official code calls `torch.topk` / `Tensor.argsort(descending=True)`, whose order among
exactly equal values is unspecified (it differs between CPU and CUDA and with the tensor size; on
CPU it is often not lowest-index-first). Every function therefore takes `tie_break`:
"torch" (default) calls the same torch operation on a tensor of the same shape as the official
code, so it reproduces the official result on the same device bit for bit, ties included;
"stable" resolves ties by the lower index first (a stable sort), which is device independent.
`argmax` / `argmin` return the first extreme on every device, so no option is needed there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

TIE_BREAKS = ("torch", "stable")


# ----------------------------------------------------------------------------- helpers


def _check_tie_break(tie_break: str) -> None:
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")


def _topk_indices(row: torch.Tensor, k: int, *, largest: bool = True, tie_break: str = "torch"):
    """Indices of the k largest (smallest) entries of a 1-D tensor, best first (topk sorted=True).

    "torch": `torch.topk` on the (1, n) tensor, as the official code calls it (dim=-1).
    "stable": stable sort, lower index first among equal values.
    """
    _check_tie_break(tie_break)
    if k < 0 or k > row.numel():
        raise ValueError(f"topk of {k} from {row.numel()} values")
    if tie_break == "torch":
        return torch.topk(row.unsqueeze(0), k, dim=-1, largest=largest).indices[0]
    return torch.sort(row, descending=largest, stable=True).indices[:k]


def _argsort_descending(row: torch.Tensor, *, tie_break: str = "torch"):
    _check_tie_break(tie_break)
    if tie_break == "torch":
        return row.unsqueeze(0).argsort(dim=-1, descending=True)[0]
    return torch.sort(row, descending=True, stable=True).indices


def _as_long(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.long)


# ----------------------------------------------------------------------------- VisPruner


class VisPrunerResult(NamedTuple):
    kept: torch.Tensor  # (T,) patch indices, ascending: the order the language model sees them
    important: torch.Tensor  # the T_imp most attended, in descending-attention order
    diverse: torch.Tensor  # the residual survivors, in the order of the last matching round


def vispruner_select(
    cls_attn: torch.Tensor,
    features: torch.Tensor,
    num_tokens: int,
    important_ratio: float = 0.5,
    *,
    residual_mode: str = "official",
    tie_break: str = "torch",
) -> VisPrunerResult:
    """VisPruner's token selection, `LlavaMetaForCausalLM.encode_images`, llava_arch.py 141-186.

    cls_attn: (heads, N) [CLS]-row attention to the N patches at the feature layer
        (clip_encoder.py 36-52: `attentions[select_layer][:, :, 0, 1:]`, line 43), or (N,) already averaged
        over heads. Heads are averaged with `mean` (line 154), in the input dtype.
    features: (N, C) patch features of the same layer, before the projector (line 142).
    num_tokens: T, the visual token budget (`get_visual_token_num`).
    important_ratio: r, default 0.5 (llava/eval/model_vqa_loader.py 151-152).

    T_imp = int(T * r) patches with the largest head-mean attention (`argsort(descending=True)`,
    lines 148-158); the remaining T_div = T - T_imp come from the residual list (argsort order) by
    rounds of duplicate removal (lines 161-179): cosine of unit features (`x / x.norm()`, no eps),
    even places matched against odd places, each even token's best match (max), the r = min(8,
    R - T_div) best-matched evens dropped (`argsort(descending=True)[r:]`), new residual = surviving
    evens (in that score order) then all odds; stop when r <= 0. The kept set reaches the language
    model in patch order through a boolean mask (lines 181-186 and 272-273), so `kept` is sorted.
    T >= N keeps everything (the loop never runs).

    residual_mode: lines 172-176 index the even half with an index tensor expanded to
    (R // 2 - r) columns while the scores have ceil(R / 2) - r: for an odd R (e.g. T = 102 at
    ratio 0.5, R = 576 - 51 = 525) this fails with a shape mismatch, except where broadcasting
    lets it through (R // 2 - r == 1: correct result; R // 2 - r == 0: no even survives instead of
    one, leaving T - 1 tokens); `expand` also fails when R // 2 - r <= -2 (tiny N only).
    "official" reproduces exactly that: ValueError where the official code raises, the broadcast
    results where it does not. "natural" always keeps the ceil(R / 2) - r lowest-scored evens
    (what the algorithm means), so every budget works.

    The matching products are taken with a leading batch dimension of 1 and strided halves, as in
    the official code, so cosines that are equal in exact arithmetic round the same way.
    """
    if residual_mode not in ("official", "natural"):
        raise ValueError(f"residual_mode must be 'official' or 'natural', got {residual_mode!r}")
    _check_tie_break(tie_break)
    if features.dim() != 2:
        raise ValueError("features must be (N, C)")
    n = features.shape[0]
    attn = cls_attn.mean(dim=0) if cls_attn.dim() == 2 else cls_attn
    if attn.shape != (n,):
        raise ValueError(f"cls_attn covers {tuple(attn.shape)} patches, features {n}")
    if num_tokens < 0:
        raise ValueError("num_tokens must be >= 0")

    t_imp = int(num_tokens * important_ratio)
    t_div = num_tokens - t_imp
    order = _argsort_descending(attn, tie_break=tie_break)
    important = order[:t_imp]
    residual = order[t_imp:]

    unit = features / features.norm(dim=-1, keepdim=True)
    while t_div > 0:
        big_r = residual.shape[0]
        r = min(8, big_r - t_div)
        if r <= 0:
            break
        # batch dimension of 1 and strided halves, as the official code: exactly tied cosines then
        # round the same way on the same device (a 2-D matmul rounds them differently).
        tokens = unit[residual].unsqueeze(0)
        evens, odds = residual[0::2], residual[1::2]
        best = (tokens[..., ::2, :] @ tokens[..., 1::2, :].transpose(-1, -2)).max(dim=-1).values[0]
        survivors = _argsort_descending(best, tie_break=tie_break)[r:]
        if residual_mode == "official":
            width = big_r // 2 - r  # expand(-1, width) at line 174
            if width <= -2:
                raise ValueError(
                    f"VisPruner official code fails here (llava_arch.py 174, expand to {width}): "
                    f"R={big_r}, r={r}; use residual_mode='natural'"
                )
            width = 1 if width == -1 else width
            d = survivors.shape[0]
            if width == d or width == 1:
                pass
            elif d == 1:
                survivors = survivors.repeat(width)  # broadcast: width copies (only width 0 occurs)
            else:
                raise ValueError(
                    f"VisPruner official code fails here (llava_arch.py 172-176, shape mismatch "
                    f"{width} vs {d}): odd residual count R={big_r}; use residual_mode='natural'"
                )
        residual = torch.cat([evens[survivors], odds])

    selected = torch.cat([important, residual]) if t_div > 0 else important
    mask = torch.zeros(n, dtype=torch.bool)
    mask[selected] = True
    kept = torch.nonzero(mask).flatten()
    return VisPrunerResult(kept, important, residual if t_div > 0 else residual[:0])


# ----------------------------------------------------------------------------- VisionZip

# README.md 127-128 at the pinned commit gives 54 + 10 for 64 tokens; 108 + 20 and 162 + 30 are
# the paper's splits for 128 and 192 (same 27:5 ratio). visionzip/main.py 5 defaults to
# dominant=191, contextual=30 (221 tokens), which matches none of them.
VISIONZIP_SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}
VISIONZIP_MAIN_DEFAULT = (191, 30)


class VisionZipResult(NamedTuple):
    tokens: torch.Tensor  # (dominant + contextual, C): the order the projector / language model sees
    dominant_positions: torch.Tensor  # (dominant,) sequence positions (0 = [CLS]), ascending
    target_positions: torch.Tensor  # (contextual,) sequence positions of the contextual targets
    assignment: torch.Tensor  # (M - contextual,) target slot of each other remaining token


def visionzip_compress(
    cls_attn: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    *,
    tie_break: str = "torch",
) -> VisionZipResult:
    """VisionZip's compression, `CLIPVisionTower_VisionZip.forward`, visionzip/clip_encoder.py 42-85.

    cls_attn: (heads, N) [CLS]-row attention to the N patches of the second-to-last CLIP layer
        (`attentions[-2][:, :, 0, 1:]`, line 51), summed over heads (line 52, a sum, not a mean),
        or (N,) already summed.
    hidden: (N + 1, C) `hidden_states[-2]` including [CLS] at position 0 (line 44).
    keys: (N + 1, d) the same layer's keys averaged over heads (`metric`, utils.py 24 and 89:
        raw keys before any scaling, `.mean(1)` over heads; the layer is the one with r = 1,
        utils.py 191), or (heads, N + 1, d), averaged here.
    dominant, contextual: as `visionzip(model, dominant, contextual)` (main.py 5-7): `dominant`
        counts the [CLS] token, so dominant - 1 patches are chosen by attention (utils.py 186-195).
        See VISIONZIP_SPLITS / VISIONZIP_MAIN_DEFAULT for the published splits.

    Dominant: topk(dominant - 1) of the head-summed attention, shifted by one, plus position 0;
    they are gathered by a mask (`masked_select`, line 57), so in sequence order, [CLS] first.
    Contextual (lines 60-80): the M = N + 1 - dominant remaining tokens in sequence order; keys
    normalised (`x / x.norm()`, no eps); targets are every step-th of them, step = max(1, M // c),
    the first c; every other remaining token joins the target of highest key cosine (`argmax`,
    first on ties); a contextual token = target hidden + the mean of its members' hidden (not
    counting the target; zero if none). Output = dominant tokens then contextual tokens
    (line 83), the order of `target_positions`.

    ValueError where the official code fails or degenerates: contextual < 1 (M // 0),
    contextual > M (fewer targets than slots: shape mismatch, or a silent broadcast when M == 1),
    dominant < 1 or dominant - 1 > N (topk out of range).
    """
    _check_tie_break(tie_break)
    if hidden.dim() != 2:
        raise ValueError("hidden must be (N + 1, C)")
    total = hidden.shape[0]
    n = total - 1
    attn = cls_attn.sum(dim=0) if cls_attn.dim() == 2 else cls_attn
    if attn.shape != (n,):
        raise ValueError(f"cls_attn covers {tuple(attn.shape)} patches, hidden has {n} + [CLS]")
    metric = keys.mean(dim=0) if keys.dim() == 3 else keys
    if metric.shape[0] != total:
        raise ValueError("keys must cover the same N + 1 positions as hidden")
    n_dom = dominant - 1
    if n_dom < 0 or n_dom > n:
        raise ValueError(f"dominant must be in 1..N + 1 = {total}, got {dominant}")
    rest = total - dominant
    if contextual < 1:
        raise ValueError("contextual must be >= 1 (the official code divides by it)")
    if contextual > rest:
        raise ValueError(f"contextual={contextual} exceeds the {rest} tokens left after the dominant ones")

    top = _topk_indices(attn, n_dom, tie_break=tie_break) + 1
    keep = torch.zeros(total, dtype=torch.bool)
    keep[0] = True
    keep[top] = True
    dominant_positions = torch.nonzero(keep).flatten()
    remaining = torch.nonzero(~keep).flatten()

    metric_rest = metric[remaining]
    metric_rest = metric_rest / metric_rest.norm(dim=-1, keepdim=True)
    hidden_rest = hidden[remaining]
    step = max(1, rest // contextual)
    targets = torch.arange(0, rest, step)[:contextual]
    is_target = torch.zeros(rest, dtype=torch.bool)
    is_target[targets] = True
    others = torch.nonzero(~is_target).flatten()

    # batched (leading dimension 1) products, as the official bmm calls: same rounding on ties
    similarity = torch.bmm(metric_rest[others].unsqueeze(0), metric_rest[targets].transpose(0, 1).unsqueeze(0))
    assignment = similarity.argmax(dim=2)[0]
    one_hot = torch.zeros(others.numel(), contextual, dtype=hidden.dtype)
    one_hot[torch.arange(others.numel()), assignment] = 1
    counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(one_hot.transpose(0, 1).unsqueeze(0), hidden_rest[others].unsqueeze(0))[0]
    contextual_tokens = hidden_rest[targets] + aggregated / counts

    tokens = torch.cat([hidden[dominant_positions], contextual_tokens])
    return VisionZipResult(tokens, dominant_positions, remaining[targets], assignment)


# ----------------------------------------------------------------------------- LLaVA-PruMerge+


def prumerge_outlier_share(cls_attn: torch.Tensor) -> float:
    """`outlier_dectection`, LLaVA-PruMerge clip_encoder.py 34-47: share of scores above Q3 + 1.5 IQR.

    The scores are cast to float32 (line 35); Q1 and Q3 are numpy's default 'linear' percentiles,
    computed here the way numpy 2.x does on a float32 array (float32 arithmetic, numpy's lerp:
    a + (b - a) t for t < 0.5, else b - (b - a)(1 - t)); the comparison is a strict '>'. Returns a
    Python float, count / n, as the official code does. (numpy 1.x computes the quartiles in
    float64 instead; the two can differ only for a score within an ulp of the bound: checked equal
    to numpy 2.4 and to numpy 1.26 on 3000 arrays, ties included.)
    """
    values = cls_attn.detach().to(torch.float32).flatten()
    n = values.numel()
    ordered = torch.sort(values).values

    def percentile(q: float) -> torch.Tensor:
        virtual = (n - 1) * q  # numpy's 'linear' virtual index
        below = math.floor(virtual)
        gamma = virtual - below
        if virtual >= n - 1:
            below = above = n - 1
        else:
            above = below + 1
        a, b = ordered[below], ordered[above]
        diff = b - a
        if gamma >= 0.5:
            return b - diff * (1 - gamma)
        return a + diff * gamma

    q1 = percentile(0.25)
    q3 = percentile(0.75)
    upper = q3 + (q3 - q1) * 1.5
    count = int((values > upper).sum())
    return count / n


class PruMergeResult(NamedTuple):
    tokens: torch.Tensor  # (len(kept) + 1, C): merged kept tokens in `kept` order, then the extra token
    kept: torch.Tensor  # patch indices (0..N-1) in the order the language model sees them
    complement: torch.Tensor  # the non-kept patch indices the code uses (ascending)
    share: float  # the reduction ratio used (the outlier share when adaptive)


def prumerge_plus(
    q: torch.Tensor,
    k: torch.Tensor,
    features: torch.Tensor,
    *,
    adaptive: bool = True,
    reduction_ratio: float = 1 / 8,
    sample_stop: int | None = None,
    neighbours: int = 32,
    tie_break: str = "torch",
) -> PruMergeResult:
    """LLaVA-PruMerge+, `CLIPVisionTower.token_prune_merge_advanced_plus`, clip_encoder.py 174-281.

    q, k: (N + 1, C) outputs of q_proj and k_proj of CLIP's last layer (the hooks on
        `encoder.layers[23]`, lines 182-196), [CLS] first; one head over the full width.
    features: (N, C) patch features (`hidden_states[-2][:, 1:]`, lines 186-188).
    adaptive: True is the path `forward` uses (line 300, if_adaptive=True); False is the
        budget-matched path with `reduction_ratio` (lines 216-227).

    attn = softmax(q k^T * C ** -0.5) over all N + 1 keys, C = features width (lines 198-201);
    cls_attn = its [CLS] row over the patches. Adaptive: share = prumerge_outlier_share(cls_attn);
    topk(int(N * share)) (sorted, largest first); then spatial samples arange(0, stop,
    int(int(1 / share) / 3)) not already taken, ascending, appended (lines 208-214). Fixed:
    topk(int(N * reduction_ratio)) then arange(int(step / 2), stop, step), step =
    int(1 / reduction_ratio), appended WITHOUT removing duplicates (line 224 is commented out);
    the official code needs exactly as many samples as topk entries (new_idx is 2 * k wide).
    Merging (lines 229-278): the complement is `complement_idx` - the ascending non-kept indices,
    except that with d duplicate kept entries it loses its d smallest values (reproduced here);
    keys are L2-normalised (F.normalize, eps 1e-12); for each kept token i in order, the other
    kept tokens (in order, a duplicate of i included) then the complement form the candidates;
    topk(neighbours=32) by key cosine; new token = x_i + sum of those candidates' features weighted
    by their cls_attn (no normalisation). One extra token = sum over the complement of
    cls_attn * feature, appended last. Output order = kept order (not patch order) + extra.

    sample_stop: the official arange stops at a hard-coded 575 (lines 210 and 221), i.e. N - 1 for
        CLIP-L/336 (N = 576); default None means N - 1, so other N keep the same meaning.
    ValueError where the official code fails: a share of 0 (1 / 0, line 209), a share above 1/3
    (arange step int(int(1 / share) / 3) == 0, line 210), a fixed path whose sample count differs
    from its topk count (line 226), fewer than `neighbours` candidates (topk, line 268), a sample
    index >= N (gather out of range), an adaptive path where every sample is already taken (an
    empty float tensor is concatenated to the long indices, line 212-213: gather fails).
    A share above 1/3 and an all-taken sample list cannot happen in practice: at most about a quarter of the
    scores can lie above Q3 + 1.5 IQR, so the share stays below 1/3, and there are about three
    samples per topk token.
    """
    _check_tie_break(tie_break)
    n, c = features.shape
    if q.shape[0] != n + 1 or k.shape[0] != n + 1:
        raise ValueError("q and k must be (N + 1, C) with [CLS] first")
    stop = n - 1 if sample_stop is None else sample_stop
    attn = torch.softmax((q @ k.transpose(0, 1)) * c**-0.5, dim=-1)
    cls_attn = attn[0, 1:]

    if adaptive:
        share = prumerge_outlier_share(cls_attn)
        if share == 0:
            raise ValueError("PruMerge+ adaptive share is 0: the official code divides by it (line 209)")
    else:
        share = reduction_ratio
        if share <= 0:
            raise ValueError("reduction_ratio must be > 0")
    left = int(n * share)
    top = _topk_indices(cls_attn, left, tie_break=tie_break)
    step_length = int(1 / share)
    if adaptive:
        step = int(step_length / 3)
        if step == 0:
            raise ValueError(f"PruMerge+ share {share:.4f} > 1/3 gives an arange step of 0 (clip_encoder.py 210)")
        taken = set(top.tolist())
        samples = [x for x in range(0, stop, step) if x not in taken]
        if not samples:
            raise ValueError("every spatial sample is already taken: the official code fails (212-213)")
        kept = torch.cat([top, _as_long(samples)])
    else:
        samples = list(range(int(step_length / 2), stop, int(step_length)))
        if len(samples) != left:
            raise ValueError(
                f"fixed path: {len(samples)} spatial samples for {left} topk tokens; the official "
                f"code needs them equal (clip_encoder.py 219-226)"
            )
        kept = torch.cat([top, _as_long(samples)])
    if kept.numel() and int(kept.max()) >= n:
        raise ValueError(f"spatial sample {int(kept.max())} is outside the {n} patches")

    taken_mask = torch.zeros(n, dtype=torch.bool)
    taken_mask[kept] = True
    duplicates = kept.numel() - int(taken_mask.sum())
    complement = torch.nonzero(~taken_mask).flatten()[duplicates:]

    key_unit = torch.nn.functional.normalize(k[1:], p=2, dim=-1)
    x_kept, a_kept, k_kept = features[kept], cls_attn[kept], key_unit[kept]
    x_comp, a_comp, k_comp = features[complement], cls_attn[complement], key_unit[complement]
    merged = torch.empty_like(x_kept)
    for i in range(kept.numel()):
        others = torch.cat([torch.arange(0, i), torch.arange(i + 1, kept.numel())])
        cand_x = torch.cat([x_kept[others], x_comp])
        cand_a = torch.cat([a_kept[others], a_comp])
        cand_k = torch.cat([k_kept[others], k_comp])
        if cand_x.shape[0] < neighbours:
            raise ValueError(f"only {cand_x.shape[0]} candidates for topk({neighbours}) (line 268)")
        # (1, 1, C) @ (1, C, M) as the official bmm (line 266): same rounding on ties
        cosine = torch.bmm(k_kept[i].view(1, 1, -1), cand_k.transpose(0, 1).unsqueeze(0)).view(-1)
        near = _topk_indices(cosine, neighbours, tie_break=tie_break)
        merged[i] = x_kept[i] + (cand_x[near] * cand_a[near].unsqueeze(-1)).sum(dim=0)
    extra = (x_comp * a_comp.unsqueeze(-1)).sum(dim=0, keepdim=True)
    return PruMergeResult(torch.cat([merged, extra]), kept, complement, share)


# ----------------------------------------------------------------------------- PyramidDrop

PYRAMIDDROP_LAYERS = (8, 16, 24)  # scripts/v1_5/pdrop_eval/*.sh: --layer_list '[8,16,24]'
PYRAMIDDROP_RATIOS = (0.5, 0.25, 0.125)  # --image_token_ratio_list "[0.5,0.25,0.125]" (lambda 0.5)


def pyramiddrop_counts(n_image: int, ratios=PYRAMIDDROP_RATIOS) -> list[int]:
    """Image-token counts per stage, modeling_llama_pdrop.py 1306-1307 with the eval scripts' list.

    The ratio list gets 1.0 prepended (llava/eval/model_vqa_loader.py 96); stage s holds
    int(n * ratio[s]) and keeps int(n * ratio[s + 1]), each from the ORIGINAL count n.
    n = 576 gives [576, 288, 144, 72].
    """
    full = [1.0, *ratios]
    return [int(n_image * r) for r in full]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def pyramiddrop_rank(
    hidden: torch.Tensor,
    *,
    image_start: int,
    image_len: int,
    keep: int,
    norm_weight: torch.Tensor,
    norm_eps: float,
    wq: torch.Tensor,
    wk: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    query_index: int | None = None,
    bq: torch.Tensor | None = None,
    bk: torch.Tensor | None = None,
    repeat_kv: bool = False,
    tie_break: str = "torch",
) -> torch.Tensor:
    """PyramidDrop's ranking at one stage, `LlamaModel.pdrop_rank_drop`, modeling_llama_pdrop.py
    1291-1468 (inference path, batch 1, right padding, no padding tokens; called at 1221-1236).

    hidden: (L, d) output of layer rank_layer - 1 (the stage boundary, lines 1221-1236).
    norm_weight, norm_eps, wq, wk (, bq, bk): input_layernorm, q_proj and k_proj of the NEXT layer
        (`self.layers[rank_layer]`, lines 1320-1332). RMSNorm as LlamaRMSNorm (lines 113-118):
        computed in float32 (also for float64 input), cast back, then times the weight.
    cos, sin: (max_len, head_dim) rotary tables as `rotary_emb(value_states, seq_len=L)` returns
        them (line 1340, already in the hidden dtype; rotary at 1342); indexed by `position_ids`
        (default arange(L): positions are renumbered 0..L-1 after every stage, line 1446).
    image_start, image_len: the image span in the current sequence (`image_token_posi`,
        `int(n * ratio[stage])`); keep: int(n * ratio[stage + 1]) (see pyramiddrop_counts).
    query_index: the last instruction token, `prompt_len + image_tokens - 1` (line 1390), which is
        the last position (default L - 1) of an inference prompt.

    scores = softmax over all L keys (float32 softmax, cast back to the hidden dtype) of
    q_query . k_j / sqrt(head_dim) plus a causal mask (`finfo(dtype).min` after the query, line
    1346), averaged over heads, the image columns, averaged over the (single) query row; topk(keep),
    plus image_start, sorted ascending (lines 1394-1407). Returns those absolute positions; the new
    sequence is [0, image_start) + them + [image_start + image_len, L).

    Grouped-query attention: the official code multiplies the queries by keys that were never
    repeated (lines 1391-1395), which only works for num_kv_heads == num_heads or 1 (broadcast).
    Other head counts raise ValueError unless repeat_kv=True (keys repeated per group, as in the
    model's own attention).
    """
    _check_tie_break(tie_break)
    length, _width = hidden.shape
    head_dim = wq.shape[0] // num_heads
    if num_kv_heads not in (num_heads, 1) and not repeat_kv:
        raise ValueError(
            "PyramidDrop's official ranking does not repeat key heads (modeling_llama_pdrop.py "
            "1391-1395): num_kv_heads must equal num_heads or be 1; pass repeat_kv=True otherwise"
        )
    if not 0 <= keep <= image_len or image_start + image_len > length:
        raise ValueError("keep / image span out of range")
    if position_ids is None:
        position_ids = torch.arange(length)
    if query_index is None:
        query_index = length - 1

    dtype = hidden.dtype
    h32 = hidden.to(torch.float32)
    variance = h32.pow(2).mean(-1, keepdim=True)
    normed = norm_weight * (h32 * torch.rsqrt(variance + norm_eps)).to(dtype)

    linear = torch.nn.functional.linear
    query = linear(normed, wq, bq)[query_index : query_index + 1]  # all rows projected, then one taken
    key = linear(normed, wk, bk)
    query = query.view(1, num_heads, head_dim).transpose(0, 1)  # (H, 1, hd)
    key = key.view(length, num_kv_heads, head_dim).transpose(0, 1)  # (Hkv, L, hd)
    cos_q, sin_q = cos[position_ids[query_index : query_index + 1]], sin[position_ids[query_index : query_index + 1]]
    cos_k, sin_k = cos[position_ids], sin[position_ids]
    query = query * cos_q + _rotate_half(query) * sin_q
    key = key * cos_k + _rotate_half(key) * sin_k
    if repeat_kv and num_kv_heads != num_heads:
        key = key.repeat_interleave(num_heads // num_kv_heads, dim=0)

    logits = torch.matmul(query, key.transpose(1, 2)) / math.sqrt(head_dim)  # (H, 1, L)
    mask = torch.zeros(length, dtype=dtype)
    mask[query_index + 1 :] = torch.finfo(dtype).min
    logits = logits + mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)
    per_key = probs.mean(dim=0)[:, image_start : image_start + image_len]  # (1, image_len)
    score = per_key.mean(dim=0)
    top = _topk_indices(score, keep, tie_break=tie_break) + image_start
    return top.sort().values


# ----------------------------------------------------------------------------- SparseVLM v1.5

SPARSEVLM_LAYERS = (2, 6, 15)  # score.py 5 (layer_dict), modelling_sparse_llama.py 69 (pruning_loc)
SPARSEVLM_TABLE = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}  # score.py 7-15


def sparsevlm_keep_count(budget: int, layer_idx: int, image_len: int) -> int:
    """Visual tokens kept at a pruning layer: min(table[budget][stage], image_len - 1), score.py 35."""
    if budget not in SPARSEVLM_TABLE:
        raise ValueError(f"SparseVLM v1.5 has tables for budgets {sorted(SPARSEVLM_TABLE)} only")
    if layer_idx not in SPARSEVLM_LAYERS:
        raise ValueError(f"SparseVLM v1.5 prunes at layers {SPARSEVLM_LAYERS} only")
    return min(SPARSEVLM_TABLE[budget][SPARSEVLM_LAYERS.index(layer_idx)], image_len - 1)


def sparsevlm_text_raters(embeds: torch.Tensor, image_start: int, image_len: int) -> torch.Tensor:
    """The text raters, modelling_sparse_llama.py 197-204 (computed once, from the input embeddings).

    embeds: (L, d) the input embeddings of the whole prompt (`inputs_embeds`); the image span is
    [image_start, image_start + image_len) (image_len = `image_shape`, 576) and the text is
    everything after it. m = softmax over text of (image @ text^T), averaged over the image rows;
    raters = text positions with m > mean(m), ascending, RELATIVE to the text start (the official
    `t_token_idx[1]`, re-based on the current text start at every later layer).
    ValueError when there is no text after the image or no rater (official: a mean over an empty
    set, NaN scores).
    """
    text_start = image_start + image_len
    if embeds.shape[0] <= text_start:
        raise ValueError("SparseVLM needs text after the image")
    relevance = (embeds[image_start:text_start] @ embeds[text_start:].transpose(0, 1)).softmax(dim=1)
    relevance = relevance.mean(dim=0)
    raters = torch.nonzero(relevance > relevance.mean()).flatten()
    if raters.numel() == 0:
        raise ValueError("no text rater (all text tokens equally relevant)")
    return raters


def sparsevlm_relation(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    image_start: int,
    image_len: int,
    raters: torch.Tensor,
    repeat_kv: bool = False,
) -> torch.Tensor:
    """Per-visual-token score at a pruning layer: LlamaDynamicvitFlashAttention2.forward with
    return_logits (modelling_sparse_llama.py 564-578) + `attn_postprocess_topk` (score.py 17-26).

    q: (heads, L, head_dim), k: (kv_heads, L, head_dim): that layer's post-RoPE queries and keys
    (positions renumbered 0..L-1 after each stage, modelling_sparse_llama.py 308/317).
    attention = softmax(q k^T * (1 / sqrt(head_dim)) + causal -inf mask) in the q dtype (no float32
    upcast here), mean over heads, rows = raters + text start (text start = image_start +
    image_len), columns = the image span, mean over the rater rows. Returns (image_len,).
    The official logits are taken before `repeat_kv`, like PyramidDrop: kv_heads must equal heads
    or be 1 unless repeat_kv=True.
    """
    heads, length, head_dim = q.shape
    if k.shape[0] not in (heads, 1):
        if not repeat_kv:
            raise ValueError("SparseVLM's logits use unrepeated keys: kv heads must equal heads or be 1")
        k = k.repeat_interleave(heads // k.shape[0], dim=0)
    scale = 1 / math.sqrt(head_dim)
    bias = torch.zeros(length, length, dtype=q.dtype)
    bias.masked_fill_(torch.ones(length, length, dtype=torch.bool).tril().logical_not(), float("-inf"))
    attn = torch.softmax(q @ k.transpose(1, 2) * scale + bias, dim=-1)
    attn = attn.mean(dim=0)
    rows = raters + image_start + image_len
    return attn[rows][:, image_start : image_start + image_len].mean(dim=0)


def sparsevlm_dpc_knn_merge(
    x: torch.Tensor, cluster_num: int, noise: torch.Tensor, *, tie_break: str = "torch"
) -> torch.Tensor:
    """DPC-kNN clustering and merging, `cluster_and_merge`, utils.py 247-311 (batch 1).

    x: (n, C) tokens; cluster_num: number of clusters, also the k of the kNN density (line 256);
    noise: (n,) the U[0, 1) draw the official code makes with `torch.rand(density.shape)` (lines
    259-260; it is multiplied by 1e-6 here, as there). Pass zeros for a noise-free result or the
    same seeded draw to reproduce the official one: where densities tie or underflow, the draw
    decides the centres.

    dist = ||x_i - x_j|| / sqrt(C); density = exp(-mean of the squared cluster_num smallest
    distances (self included)) + 1e-6 * noise; delta_i = min distance to a denser token (the max
    distance if none); centres = topk(delta * density, cluster_num), in that order; each token
    joins its nearest centre (`argmin`, first on ties), a centre always itself; a merged token =
    sum of members * 1 / (count + 1e-6) (lines 287-309). Returns (cluster_num, C) in centre order.
    """
    n, c = x.shape
    if not 1 <= cluster_num <= n:
        raise ValueError("cluster_num must be in 1..n")
    if noise.shape != (n,):
        raise ValueError("noise must have one value per token")
    dist = (x.unsqueeze(1) - x.unsqueeze(0)).norm(dim=-1, p=2) / (c**0.5)
    nearest = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    density = density + noise.to(density.dtype) * 1e-6
    denser = (density.unsqueeze(0) > density.unsqueeze(1)).to(x.dtype)  # [i, j]: j denser than i
    dist_max = dist.max()
    delta = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values
    centres = _topk_indices(delta * density, cluster_num, tie_break=tie_break)
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(cluster_num)
    counts = torch.zeros(cluster_num, 1, dtype=x.dtype)
    counts.index_add_(0, assign, x.new_ones(n, 1))
    weight = 1 / (counts + 1e-6)
    merged = torch.zeros(cluster_num, c, dtype=x.dtype)
    merged.index_add_(0, assign, x * weight[assign])
    return merged


class SparseVLMStage(NamedTuple):
    hidden: torch.Tensor  # (L', d) the new sequence handed to the next layer
    kept_positions: torch.Tensor  # positions (in the old sequence) of the kept visual tokens, ascending
    recycled_positions: torch.Tensor  # positions of the dropped tokens sent to clustering, in topk order
    merged: torch.Tensor  # (cluster_num, d) the recycled tokens, placed right after the kept ones
    image_len: int  # visual tokens in the new sequence: kept + cluster_num


def sparsevlm_prune_stage(
    layer_output: torch.Tensor,
    relation: torch.Tensor,
    *,
    image_start: int,
    keep: int,
    noise: torch.Tensor,
    tie_break: str = "torch",
) -> SparseVLMStage:
    """One SparseVLM v1.5 pruning step, modelling_sparse_llama.py 267-323 with score.py 33-36.

    layer_output: (L, d) the pruning layer's OUTPUT hidden states (`layer_outputs[0]`).
    relation: (image_len,) sparsevlm_relation's scores; keep = sparsevlm_keep_count(...).
    noise: (m,) with m = int(0.3 * dropped) + 1: the U[0, 1) draw of cluster_and_merge for the m
        recycled tokens (see sparsevlm_dpc_knn_merge).

    kept = topk(relation, keep) (a mask: ascending positions); dropped = the others, ascending;
    m = int(0.3 * dropped) + 1 of them with the largest relation (topk order) are clustered into
    int(m / 10) + 1 tokens (lines 287-296); new sequence = the tokens before the image, the kept
    visual tokens, the merged tokens, the text (lines 298-305); positions are then 0..L'-1.
    With keep >= image_len nothing can be dropped (the official table always keeps <= n - 1).
    """
    length = layer_output.shape[0]
    image_len = relation.shape[0]
    if not 0 <= keep <= image_len - 1:
        raise ValueError("SparseVLM keeps at most image_len - 1 tokens (score.py 35)")
    chosen = _topk_indices(relation, keep, tie_break=tie_break)
    mask = torch.zeros(image_len, dtype=torch.bool)
    mask[chosen] = True
    kept_rel = torch.nonzero(mask).flatten()
    dropped_rel = torch.nonzero(~mask).flatten()
    m = int(dropped_rel.numel() * 0.3) + 1
    recycled = dropped_rel[_topk_indices(relation[dropped_rel], m, tie_break=tie_break)]
    cluster_num = int(m / 10) + 1
    if noise.shape != (m,):
        raise ValueError(f"noise must be ({m},): one U[0,1) value per recycled token")
    merged = sparsevlm_dpc_knn_merge(layer_output[recycled + image_start], cluster_num, noise, tie_break=tie_break)
    text_start = image_start + image_len
    hidden = torch.cat(
        [
            layer_output[:image_start],
            layer_output[kept_rel + image_start],
            merged,
            layer_output[text_start:length],
        ]
    )
    return SparseVLMStage(
        hidden, kept_rel + image_start, recycled + image_start, merged, kept_rel.numel() + cluster_num
    )
