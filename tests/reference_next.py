"""An independent reference of three [CLS]-attention methods on LLaVA-NeXT (tiled images), as the
authors' own LLaVA code does it, re-expressed on transformers: VisPruner, VisionZip, PruMerge+.

Read from the authors' code at these commits (bare mirrors under /work/.mirror):

- VisPruner: Theia-4869/VisPruner @ aefa01a, llava/model/llava_arch.py `encode_images` and
  `prepare_inputs_labels_for_multimodal` (the `spatial_unpad` + `anyres` branch).
- VisionZip: dvlab-research/VisionZip @ 3151f6d, visionzip/clip_encoder.py `forward` and
  visionzip/llava_arch.py `prepare_inputs_labels_for_multimodal_visionzip`,
  `restore_image_features_sorted`.
- PruMerge+: 42Shawn/LLaVA-PruMerge @ 097c041, llava/model/llava_arch.py
  `prepare_inputs_labels_for_multimodal` (images.ndim == 5) and clip_encoder.py
  `token_prune_merge_advanced_plus`.

Every tower item (base image first, then the tiles row by row: the order of transformers'
`get_image_features` and of the authors' LLaVA) is selected on its own by the already validated
per-image references of tests/reference_baselines.py; what is re-expressed here is only how the
authors lay the items' outputs into the prompt on a tiled model:

- VisPruner: one boolean index mask per item; the tiles' masks laid on the canvas exactly as the
  features (view (rows, cols, s, s), permute, flatten), `unpad_image` on the mask, a column of
  True appended (so every newline slot is kept), flattened; the base mask on the base features.
  The features are the model's own projected ones (image_newline at the newline slots): the
  sequence is the span's positions whose mask is True, in span order.
- VisionZip: the base item's whole output as is ([CLS], dominant patches ascending, contextual
  tokens); the tiles' dominant patches placed on the FULL canvas (not unpadded; the authors
  hard-code 24 patches per side, here the tower's own side) and read in raster order of that
  canvas (no newline: theirs builds `image_newline_expanded` and never uses it); then every
  tile's [CLS] token in tile order; then every tile's contextual tokens, tile after tile. All
  through the projector.
- PruMerge+: every item's output (picks: most attended then samples, then the extra token)
  flattened item after item, base first: no newline, no unpadding. All through the projector.

Budget (asap's specification on a tiled model): each item gets T = k // most_items tokens, with
most_items = 1 + the most tiles any of `image_grid_pinpoints` gives; k >= the span's token count
keeps the image whole. Positions: "renumber" numbers the whole prompt 0..M-1 in the authors'
order; "original" gives each token a slot (a span index; see `assign_slots`) and feeds the tokens
in slot order at span_start + slot, the text after the span at its own positions.

This module imports nothing from asapcli but `image_spans` (which only finds the run of image
tokens); canvas layout uses transformers' `get_anyres_image_grid_shape` and `unpad_image`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import reference_baselines
import torch
from reference_baselines import prumerge_outlier_share, prumerge_plus, visionzip_compress, vispruner_select
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from asapcli.engine import image_spans

NEWLINE = -1  # marks a newline slot in a laid-out canvas of patch ids


# ----------------------------------------------------------------------------- the tower's outputs


class Items(NamedTuple):
    """What the authors' code reads from the tower, one row per tower item (base, then tiles)."""

    hidden: torch.Tensor  # (n, N + 1, C): hidden_states[vision_feature_layer], [CLS] first
    attention: torch.Tensor  # (n, heads, N): the feature layer's [CLS] row over the patches
    keys: torch.Tensor  # (n, N + 1, head_dim): that layer's raw keys averaged over heads (VisionZip)
    query: torch.Tensor  # (n, N + 1, C'): the last layer's q_proj output (PruMerge+'s hook)
    key: torch.Tensor  # (n, N + 1, C'): the last layer's k_proj output


def encoder_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def full_attention(layer, hidden: torch.Tensor) -> torch.Tensor:
    """(n, heads, L, L): softmax of every query against every key of `layer` on its input."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    shape = (*hidden.shape[:2], -1, attn.head_dim)
    query, key = (proj(normed).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
    return torch.softmax((query @ key.transpose(2, 3)) * attn.scale, dim=-1, dtype=torch.float32)


def is_tiled(model) -> bool:
    return getattr(model.config, "image_grid_pinpoints", None) is not None


def tower_pixels(model, inputs) -> torch.Tensor:
    """The tower's batch for the prompt's one image: its items, as `get_image_features` cuts them."""
    pixels = inputs["pixel_values"]
    if not is_tiled(model):
        return pixels
    items = image_size_to_num_patches(
        inputs["image_sizes"][0], model.config.image_grid_pinpoints, model.config.vision_config.image_size
    )
    return pixels[0, :items]


def tower_items(model, inputs) -> Items:
    config = model.config
    layers = encoder_layers(model)
    hooked = {}
    last = layers[-1].self_attn
    hooks = [
        last.q_proj.register_forward_hook(lambda m, i, o: hooked.__setitem__("q", o)),
        last.k_proj.register_forward_hook(lambda m, i, o: hooked.__setitem__("k", o)),
    ]
    try:
        with torch.inference_mode():
            states = model.model.vision_tower(tower_pixels(model, inputs), output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    index = config.vision_feature_layer % len(layers)
    layer, layer_input = layers[index], states[index]
    with torch.inference_mode():
        attention = full_attention(layer, layer_input)[:, :, 0, 1:]
        keys = layer.self_attn.k_proj(layer.layer_norm1(layer_input))
        keys = keys.view(*keys.shape[:2], -1, layer.self_attn.head_dim).mean(2)
    return Items(states[config.vision_feature_layer], attention, keys, hooked["q"], hooked["k"])


# ----------------------------------------------------------------------------- the span's layout


class Layout(NamedTuple):
    side: int  # patches per side of one item
    grid: tuple[int, int]  # (tile rows, tile columns); (0, 0) untiled
    canvas_ids: torch.Tensor  # (rows * side, cols * side): each cell's tile patch id N + t * N + p, full canvas
    span_ids: torch.Tensor  # (span length,): base patch p -> p; tile patch -> N + t * N + p; NEWLINE
    span_of: dict[int, int]  # item patch id (base p; tile t: N + t * N + p) -> span index, if in the span

    @property
    def patches(self) -> int:
        return self.side * self.side

    @property
    def length(self) -> int:
        return self.span_ids.numel()


def lay_on_canvas(per_tile: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """(tiles, N) -> (rows * side, cols * side), the authors' (and transformers') index-mask layout:
    view(rows, cols, s, s).permute(0, 2, 1, 3), flattened."""
    rows, cols = grid
    return per_tile.view(rows, cols, side, side).permute(0, 2, 1, 3).contiguous().flatten(0, 1).flatten(1, 2)


def unpadded_with_newlines(canvas: torch.Tensor, image_size, newline) -> torch.Tensor:
    """transformers' `unpad_image` on a (H, W) canvas, then one column of `newline` appended, flattened."""
    kept = unpad_image(canvas.unsqueeze(0), image_size)[0]
    column = torch.full((kept.shape[0], 1), newline, dtype=kept.dtype)
    return torch.cat([kept, column], dim=1).flatten()


def layout(model, inputs) -> Layout:
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    n = side * side
    base = torch.arange(n)
    if not is_tiled(model):
        return Layout(side, (0, 0), torch.empty(0, 0, dtype=torch.long), base, {p: p for p in range(n)})
    image_size = inputs["image_sizes"][0]
    rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    ids = n + torch.arange(rows * cols * n).view(rows * cols, n)
    canvas = lay_on_canvas(ids, (rows, cols), side)
    span_ids = torch.cat([base, unpadded_with_newlines(canvas, image_size, NEWLINE)])
    span_of = {int(item_id): index for index, item_id in enumerate(span_ids.tolist()) if item_id != NEWLINE}
    return Layout(side, (rows, cols), canvas, span_ids, span_of)


def most_items(config) -> int:
    """1 + the most tiles any grid pinpoint gives (1 on an untiled model)."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return 1
    s = config.vision_config.image_size
    return 1 + max((h // s) * (w // s) for h, w in pinpoints)


def per_item_budget(config, k: int) -> int:
    return k // most_items(config)


def visionzip_split(tokens: int, contextual: int | None = None) -> tuple[int, int]:
    """(dominant counting [CLS], contextual) for an item of `tokens`: 10 per 64 rounded half up,
    at least 1, at most tokens - 1 (or the given count)."""
    if contextual is None:
        contextual = min(max(1, (10 * tokens + 32) // 64), tokens - 1)
    return tokens - contextual, contextual


def assign_slots(claims: list[int | None], length: int) -> list[int]:
    """Each token's span index. Walking the tokens in their order, a token claiming a span index
    (the patch it stands for, where that patch is in the span) takes it unless an earlier token
    did; then every token still without one takes the lowest span indices nobody took, in order."""
    slots: list[int | None] = [None] * len(claims)
    taken: set[int] = set()
    for i, claim in enumerate(claims):
        if claim is not None and claim not in taken:
            slots[i] = claim
            taken.add(claim)
    free = iter(index for index in range(length) if index not in taken)
    return [slot if slot is not None else next(free) for slot in slots]


# ----------------------------------------------------------------------------- the pipeline


class Pipeline(NamedTuple):
    kept: list[int]  # sorted span indices of the kept slots
    roles: list[str]  # one role per kept slot, in `kept` order
    tokens: torch.Tensor  # (M, d) projected visual tokens in the authors' order
    slots: list[int]  # each token's span index, in the authors' order
    embeds: torch.Tensor  # (1, L', d) what is fed
    positions: torch.Tensor  # (1, L')
    logits: torch.Tensor | None = None  # first-token logits (None with steps < 0: no language model run)
    greedy: list[int] | None = None  # greedy tokens
    claims: list[int | None] | None = None  # the span index each token claims (its patch's), in the authors' order


def span_of_prompt(model, inputs) -> tuple[int, int]:
    ((start, end),) = image_spans(inputs["input_ids"][0], model.config.image_token_id)
    return start, end


def feed(model, inputs, tokens: torch.Tensor, slots: list[int], renumber: bool):
    """The prompt's text around the visual tokens: in the authors' order at 0..M-1 (renumber) or
    in slot order at span_start + slot, the text after the span keeping its own positions."""
    ids = inputs["input_ids"][0]
    start, end = span_of_prompt(model, inputs)
    placed = torch.tensor(slots, dtype=torch.long)
    if not renumber:
        placed, order = placed.sort(stable=True)
        tokens = tokens[order]
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        embeds = torch.cat([embed(ids[:start]), tokens.to(embed.weight.dtype), embed(ids[end:])])[None]
    positions = torch.cat([torch.arange(start), placed + start, torch.arange(end, len(ids))])[None]
    if renumber:
        positions = torch.arange(embeds.shape[1])[None]
    return embeds, positions


def greedy(model, embeds: torch.Tensor, positions: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """First-token logits and greedy decoding by hand: each step feeds the last token at the next
    position; stops after an end-of-sequence token, as generate() does."""
    with torch.inference_mode():
        out = model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
        first = out.logits[0, -1].clone()
        tokens, cache, position = [], out.past_key_values, int(positions[0, -1])
        ends = model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [ends])
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            if tokens[-1] in ends:
                break
            position += 1
            token = torch.tensor([[tokens[-1]]])
            out = model(input_ids=token, position_ids=torch.tensor([[position]]), past_key_values=cache, use_cache=True)
    return first, tokens


def finish(model, inputs, tokens, slots, roles_by_slot: dict[int, str], renumber: bool, steps: int, claims=None):
    embeds, positions = feed(model, inputs, tokens, slots, renumber)
    logits, answer = greedy(model, embeds, positions, steps) if steps >= 0 else (None, None)
    kept = sorted(slots)
    roles = [roles_by_slot[slot] for slot in kept]
    return Pipeline(kept, roles, tokens, slots, embeds, positions, logits, answer, claims or slots)


def vanilla(model, inputs, steps: int = 5) -> Pipeline:
    """The unpruned model: the whole span, the model's own forward and greedy decoding."""
    start, end = span_of_prompt(model, inputs)
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    kept = list(range(end - start))
    return Pipeline(
        kept, ["kept"] * len(kept), None, kept, None, None, logits, out[0, inputs["input_ids"].shape[1] :].tolist()
    )


def whole_span(model, inputs, k: int) -> bool:
    start, end = span_of_prompt(model, inputs)
    return k >= end - start


def projector(model, features: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.model.multi_modal_projector(features)


# ----------------------------------------------------------------------------- VisPruner


def vispruner_next(
    model, inputs, k: int, *, renumber: bool, important_ratio: float = 0.5, steps: int = 5, per_item: int | None = None
) -> Pipeline:
    """VisPruner on a (tiled) model. `per_item` overrides T = k // most_items (for self-checks)."""
    if per_item is None and whole_span(model, inputs, k):
        return vanilla(model, inputs, steps)
    t = per_item_budget(model.config, k) if per_item is None else per_item
    items = tower_items(model, inputs)
    lay = layout(model, inputs)
    n = lay.patches
    patches = items.hidden[:, 1:]
    masks = torch.zeros(patches.shape[:2], dtype=torch.bool)
    role_of: dict[int, str] = {}  # item patch id -> role
    for item in range(patches.shape[0]):
        result = vispruner_select(items.attention[item], patches[item], t, important_ratio, residual_mode="natural")
        masks[item, result.kept] = True
        for patch in result.kept.tolist():
            role_of[item * n + patch] = "selected" if patch in set(result.important.tolist()) else "diverse"
    features = projector(model, patches)  # (items, N, d): the model's own projected features
    base_features, base_mask = features[0], masks[0]
    if lay.grid == (0, 0):
        tokens, span_mask = base_features[base_mask], base_mask
    else:
        image_size = inputs["image_sizes"][0]
        rows, cols = lay.grid
        side = lay.side
        # the authors' feature canvas (transformers lays the span out the same way)
        tiles = features[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
        tiles = tiles.flatten(1, 2).flatten(2, 3)
        tiles = unpad_image(tiles, image_size)
        newline = model.model.image_newline[:, None, None].expand(*tiles.shape[:-1], 1)
        tiles = torch.cat([tiles, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        # the authors' mask canvas: the same layout, a column of True for the newlines
        tile_mask = lay_on_canvas(masks[1:], lay.grid, side)
        tile_mask = unpadded_with_newlines(tile_mask, image_size, True)
        tokens = torch.cat([base_features[base_mask], tiles[tile_mask]])
        span_mask = torch.cat([base_mask, tile_mask])
    slots = torch.nonzero(span_mask).flatten().tolist()
    roles = {slot: "kept" if lay.span_ids[slot] == NEWLINE else role_of[int(lay.span_ids[slot])] for slot in slots}
    return finish(model, inputs, tokens.detach(), slots, roles, renumber, steps)


# ----------------------------------------------------------------------------- VisionZip


def visionzip_next(
    model, inputs, k: int, *, renumber: bool, contextual: int | None = None, steps: int = 5, per_item: int | None = None
) -> Pipeline:
    """VisionZip on a (tiled) model; `contextual` is each item's contextual count."""
    if per_item is None and whole_span(model, inputs, k):
        return vanilla(model, inputs, steps)
    t = per_item_budget(model.config, k) if per_item is None else per_item
    dominant, contextual = visionzip_split(t, contextual)
    items = tower_items(model, inputs)
    lay = layout(model, inputs)
    n = lay.patches
    results = [
        visionzip_compress(items.attention[i], items.hidden[i], items.keys[i], dominant, contextual)
        for i in range(items.hidden.shape[0])
    ]
    outputs = projector(model, torch.stack([r.tokens for r in results]))  # (items, T, d), as theirs

    def entry(item: int, patch: int | None, role: str):
        claim = None if patch is None else lay.span_of.get(patch if item == 0 else n + (item - 1) * n + patch)
        return claim, role

    # base: its whole output, [CLS], dominant patches ascending, contextual tokens
    base = results[0]
    order = [entry(0, None, "global")]
    order += [entry(0, p - 1, "selected") for p in base.dominant_positions[1:].tolist()]
    order += [entry(0, p - 1, "contextual") for p in base.target_positions.tolist()]
    tokens = [outputs[0]]
    if len(results) > 1:
        rows, cols = lay.grid
        tiles = len(results) - 1
        tile_out = outputs[1:]
        # restore_image_features_sorted: dominant patches on the full canvas, read in raster order
        mask = torch.zeros(tiles, n, dtype=torch.bool)
        for tile, result in enumerate(results[1:]):
            mask[tile, result.dominant_positions[1:] - 1] = True
        restored = torch.zeros(tiles, n, tile_out.shape[-1], dtype=tile_out.dtype)
        restored[mask] = tile_out[:, 1:dominant].reshape(-1, tile_out.shape[-1])
        restored = restored.view(rows, cols, lay.side, lay.side, -1).permute(0, 2, 1, 3, 4).contiguous()
        restored = restored.view(rows * lay.side, cols * lay.side, -1)
        canvas_mask = lay_on_canvas(mask, lay.grid, lay.side)
        tokens += [restored[canvas_mask], tile_out[:, 0], tile_out[:, dominant:].reshape(-1, tile_out.shape[-1])]
        for item_id in lay.canvas_ids[canvas_mask].tolist():
            tile, patch = divmod(item_id - n, n)
            order.append(entry(tile + 1, patch, "selected"))
        order += [entry(tile + 1, None, "global") for tile in range(tiles)]
        for tile, result in enumerate(results[1:]):
            order += [entry(tile + 1, p - 1, "contextual") for p in result.target_positions.tolist()]
    tokens = torch.cat(tokens)
    claims = [claim for claim, _ in order]
    slots = assign_slots(claims, lay.length)
    roles = {slot: role for slot, (_, role) in zip(slots, order)}
    return finish(model, inputs, tokens, slots, roles, renumber, steps, claims)


# ----------------------------------------------------------------------------- PruMerge+


def prumerge_plus_next(
    model, inputs, k: int, *, renumber: bool, adaptive: bool = False, steps: int = 5, per_item: int | None = None
) -> Pipeline:
    """PruMerge+ on a (tiled) model: every item through `token_prune_merge_advanced_plus` on its
    own, the outputs flattened item after item (base first), no newline, no unpadding.

    Budget path: T - 1 picks and the extra token, mapped to the reference as the 1.5 tests map k:
    their fixed path at reduction_ratio (T - 1) / 2 / N ((T - 1) / 2 most attended, as many
    samples; it runs for T = 2 N / m + 1 with m dividing N). Adaptive: each item's own outlier
    share (theirs computes one share over the whole batch of items and then fails on the
    concatenation when the batch holds more than one item; per item is the only reading that
    runs). asap's documented departures where theirs cannot run, reproduced: fewer than 32
    candidates (N - 1 of them) take them all; a share of 0 counts as one outlier (1 / N); where
    every patch is picked no extra token is added."""
    if per_item is None and whole_span(model, inputs, k):
        return vanilla(model, inputs, steps)
    t = per_item_budget(model.config, k) if per_item is None else per_item
    items = tower_items(model, inputs)
    lay = layout(model, inputs)
    n = lay.patches
    neighbours = min(32, n - 1)
    order, tokens = [], []
    for item in range(items.hidden.shape[0]):
        q, key, features = items.query[item], items.key[item], items.hidden[item, 1:]
        if adaptive:
            with at_least_one_outlier(n):
                result = prumerge_plus(q, key, features, adaptive=True, neighbours=neighbours)
        else:
            ratio = (t - 1) / 2 / n
            result = prumerge_plus(q, key, features, adaptive=False, reduction_ratio=ratio, neighbours=neighbours)
        top = int(n * result.share)
        merged = result.tokens if result.complement.numel() else result.tokens[:-1]
        tokens.append(projector(model, merged))
        for rank, patch in enumerate(result.kept.tolist()):
            claim = lay.span_of.get(patch if item == 0 else n + (item - 1) * n + patch)
            order.append((claim, "selected" if rank < top else "sampled"))
        if result.complement.numel():
            order.append((None, "global"))
    claims = [claim for claim, _ in order]
    slots = assign_slots(claims, lay.length)
    roles = {slot: role for slot, (_, role) in zip(slots, order)}
    return finish(model, inputs, torch.cat(tokens), slots, roles, renumber, steps, claims)


@contextlib.contextmanager
def at_least_one_outlier(n: int):
    """The reference's adaptive share, with a share of 0 (theirs: 1 / 0) taken as one outlier."""
    share = reference_baselines.prumerge_outlier_share
    reference_baselines.prumerge_outlier_share = lambda cls_attn: share(cls_attn) or 1 / n
    try:
        yield
    finally:
        reference_baselines.prumerge_outlier_share = share


def outlier_shares(model, inputs) -> list[float]:
    """Each item's PruMerge+ outlier share (0 where their adaptive path would divide by zero)."""
    items = tower_items(model, inputs)
    shares = []
    for item in range(items.hidden.shape[0]):
        q, key = items.query[item], items.key[item]
        attn = torch.softmax((q @ key.T) * items.hidden.shape[-1] ** -0.5, dim=-1)[0, 1:]
        shares.append(prumerge_outlier_share(attn))
    return shares


METHODS = {"vispruner": vispruner_next, "visionzip": visionzip_next, "prumerge-plus": prumerge_plus_next}
