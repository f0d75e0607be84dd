"""What the vision tower saw, for methods that rank visual tokens by it (VisPruner, VisionZip,
PruMerge+): the [CLS] token's attention to the patches at the model's feature layer
(`config.vision_feature_layer`), the features that layer hands the projector ([CLS] apart) and,
for the methods that ask (`PruningMethod.vision_needs`), the head-mean keys of that layer
(VisionZip) or the one-head q and k of the tower's last layer (PruMerge+), and the projector.

`VisionTap` hooks that one encoder layer while a block of such a method is open, and nothing
else: the tower keeps its own attention implementation (SDPA, flash), and the [CLS] row is
recomputed from the layer's input with the layer's own layer_norm1, q_proj, k_proj and scale,
head by head: one query row against the N keys (O(N d) beyond the keys), never an N x N map.
`attentions[l]` of an eager forward is encoder layer l (mod the layer count) and
`hidden_states[l]` is that layer's output for a negative l (LLaVA's -2, -1) and its input for
l >= 0 (hidden_states[0] is the embeddings); the tap follows that indexing, as the authors' code
(output_attentions=True, `attentions[select_layer]`, `hidden_states[select_layer]`) does.

Each item of the tower's batch (an image of LLaVA-1.5, a tile of LLaVA-NeXT) is one
`VisionCues`, in the tower's batch order, which is the order the model places image features."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from .decoder import UnsupportedModel


@dataclass(frozen=True)
class VisionCues:
    """One image (or tile) as the vision tower saw it at the feature layer: `attention` (heads,
    N), the [CLS] row's attention to the N patches (softmax over [CLS] and the patches, as the
    eager attention computes it); `features` (N, C), the patch features the projector receives
    ([CLS] left out); `cls` (C,), the [CLS] token's feature there. Only where a method asks
    (`vision_needs`): `keys` (1 + N, d), that layer's keys averaged over heads, [CLS] first
    ("keys"); `query_key`, the q and k (1 + N, C each) of the tower's last layer computed from its
    input ("last_qk"); `project`, the model's projector, mapping (M, C) features to the
    language model's (M, d) embeddings ("project")."""

    attention: torch.Tensor
    features: torch.Tensor
    cls: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    query_key: tuple[torch.Tensor, torch.Tensor] | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None


def _encoder_layers(tower: nn.Module) -> nn.ModuleList | None:
    inner = getattr(tower, "vision_model", tower)
    encoder = getattr(inner, "encoder", None)
    return getattr(encoder, "layers", None)


def _has_cls(tower: nn.Module) -> bool:
    inner = getattr(tower, "vision_model", tower)
    return getattr(getattr(inner, "embeddings", None), "class_embedding", None) is not None


VISION_NEEDS = ("keys", "last_qk", "project")  # what a method may ask beyond attention and features


class VisionTap:
    """The hook on the feature layer of `model`'s vision tower; `cues` lists what each item of
    the tower's last forward calls gave, in order (`keep_last` lets older ones go). `needs`: what
    the method asks beyond the [CLS] attention and the features (VISION_NEEDS), computed only
    then. Refuses, naming why, a model whose tower has no [CLS] token or whose projector does not
    receive one layer's patches."""

    def __init__(self, model: PreTrainedModel, method: str, needs: tuple[str, ...] = ()):
        config = model.config
        tower = getattr(getattr(model, "model", model), "vision_tower", None)
        layers = _encoder_layers(tower) if tower is not None else None
        name = type(model).__name__
        if tower is None or layers is None or not _has_cls(tower):
            raise UnsupportedModel(
                f"{method} ranks patches by the vision tower's [CLS] attention; {name}'s vision tower has no [CLS] "
                "token (SigLIP, Qwen2.5-VL's and InternVL's pixel-shuffled features); use a CLIP-tower LLaVA model"
            )
        feature_layer = getattr(config, "vision_feature_layer", None)
        if not isinstance(feature_layer, int) or getattr(config, "vision_feature_select_strategy", None) != "default":
            raise UnsupportedModel(
                f"{method} needs one feature layer whose [CLS] the model drops (vision_feature_select_strategy "
                f"'default'); {name} has vision_feature_layer {feature_layer!r}, strategy "
                f"{getattr(config, 'vision_feature_select_strategy', None)!r}"
            )
        count = len(layers)
        self.layer = layers[feature_layer % count]  # attentions[l]: l's encoder layer
        # hidden_states[l] (count + 1 of them): that layer's output for l < 0, its input for l >= 0
        self.features_are_output = feature_layer < 0
        self.needs = frozenset(needs)
        self.last = layers[-1]  # PruMerge+'s q and k: the authors hook CLIP-L's last layer (23 of 24)
        projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
        if "project" in self.needs and projector is None:
            raise UnsupportedModel(
                f"{method} merges features before the projector; {name} has no multi_modal_projector"
            )
        self.project = projector if "project" in self.needs else None
        self.cues: list[VisionCues] = []
        self._hooks: list = []

    def install(self) -> VisionTap:
        self._hooks = [self.layer.register_forward_hook(self._capture, with_kwargs=True)]
        if "last_qk" in self.needs:  # registered after: on the same layer it runs second
            self._hooks.append(self.last.register_forward_hook(self._capture_last, with_kwargs=True))
        return self

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def keep_last(self, count: int) -> None:
        """Let go of all but the newest `count` cues."""
        self.cues = self.cues[len(self.cues) - count :] if count else []

    def newest(self, count: int) -> list[VisionCues]:
        """The cues of the last `count` items the tower saw, oldest first."""
        if len(self.cues) < count:
            raise UnsupportedModel(f"the vision tower gave {len(self.cues)} images for {count} image spans")
        return self.cues[len(self.cues) - count :]

    def _capture(self, module, args, kwargs, output) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        features = output[0] if isinstance(output, tuple) else output
        features = (features if self.features_are_output else hidden).detach()
        with torch.no_grad():
            attention, keys = cls_attention_and_keys(module, hidden)
        keys = keys.mean(dim=1) if "keys" in self.needs else [None] * len(features)  # (B, T, d): over heads
        self.cues += [
            VisionCues(a, f[1:], f[0], key, project=self.project) for a, f, key in zip(attention, features, keys)
        ]

    def _capture_last(self, module, args, kwargs, output) -> None:
        """The last layer's q and k of this forward's items, joined to their cues (the feature
        layer's hook ran first in the same forward)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            normed = module.layer_norm1(hidden)
            query, key = module.self_attn.q_proj(normed), module.self_attn.k_proj(normed)
        count = hidden.shape[0]
        fresh = self.cues[len(self.cues) - count :]
        self.cues[len(self.cues) - count :] = [replace(c, query_key=qk) for c, qk in zip(fresh, zip(query, key))]


def cls_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The [CLS] row (token 0) of the attention of a CLIP-style encoder `layer` whose input is
    `hidden` (B, 1 + N, D), to the N patches: (B, heads, N). The scores in the input dtype, the
    softmax in float32 and cast back, as transformers' eager attention does."""
    return cls_attention_and_keys(layer, hidden)[0]


def cls_attention_and_keys(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cls_attention` and the keys it was computed from, (B, heads, 1 + N, d) before any scaling
    (VisionZip groups tokens by them)."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    batch, length, _ = hidden.shape
    heads = attn.num_heads if hasattr(attn, "num_heads") else attn.config.num_attention_heads
    query = attn.q_proj(normed[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)  # (B, H, 1, d)
    keys = attn.k_proj(normed).view(batch, length, heads, -1).transpose(1, 2)  # (B, H, T, d)
    scores = torch.matmul(query, keys.transpose(2, 3)) * attn.scale
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return weights[:, :, 0, 1:], keys


def tap_for(model: PreTrainedModel, method: str, needs: tuple[str, ...] = ()) -> VisionTap:
    """The tap a method that reads the vision tower runs with (install it): one `VisionCues` per
    image span, with what the method `needs`. Refuses a tiling model (LLaVA-NeXT: an image span
    is several tiles and newline slots, which the authors' code, written for LLaVA-1.5, never
    ranks together)."""
    tap = VisionTap(model, method, needs)
    if getattr(model.config, "image_grid_pinpoints", None) is not None:
        raise UnsupportedModel(
            f"{method} supports one grid of patches per image (LLaVA-1.5 style, as its authors' code); "
            f"{type(model).__name__} tiles each image (LLaVA-NeXT), which it does not support yet"
        )
    return tap
