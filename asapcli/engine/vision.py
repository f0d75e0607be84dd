"""What the vision tower saw, for methods that rank visual tokens by it (VisPruner): the [CLS]
token's attention to the patches at the model's feature layer (`config.vision_feature_layer`)
and the patch features that layer hands the projector.

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

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .decoder import UnsupportedModel


@dataclass(frozen=True)
class VisionCues:
    """One image (or tile) as the vision tower saw it at the feature layer: `attention` (heads,
    N), the [CLS] row's attention to the N patches (softmax over [CLS] and the patches, as the
    eager attention computes it); `features` (N, C), the patch features the projector receives
    ([CLS] left out)."""

    attention: torch.Tensor
    features: torch.Tensor


def _encoder_layers(tower: nn.Module) -> nn.ModuleList | None:
    inner = getattr(tower, "vision_model", tower)
    encoder = getattr(inner, "encoder", None)
    return getattr(encoder, "layers", None)


def _has_cls(tower: nn.Module) -> bool:
    inner = getattr(tower, "vision_model", tower)
    return getattr(getattr(inner, "embeddings", None), "class_embedding", None) is not None


class VisionTap:
    """The hook on the feature layer of `model`'s vision tower; `cues` lists what each item of
    the tower's last forward calls gave, in order (`keep_last` lets older ones go). Refuses, naming why, a
    model whose tower has no [CLS] token or whose projector does not receive one layer's patches."""

    def __init__(self, model: PreTrainedModel, method: str):
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
        self.cues: list[VisionCues] = []
        self._hook = None

    def install(self) -> VisionTap:
        self._hook = self.layer.register_forward_hook(self._capture, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

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
        features = features if self.features_are_output else hidden
        with torch.no_grad():
            attention = cls_attention(module, hidden)
        self.cues += [VisionCues(a, f[1:]) for a, f in zip(attention, features.detach())]


def cls_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The [CLS] row (token 0) of the attention of a CLIP-style encoder `layer` whose input is
    `hidden` (B, 1 + N, D), to the N patches: (B, heads, N). The scores in the input dtype, the
    softmax in float32 and cast back, as transformers' eager attention does."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    batch, length, _ = hidden.shape
    heads = attn.num_heads if hasattr(attn, "num_heads") else attn.config.num_attention_heads
    query = attn.q_proj(normed[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)  # (B, H, 1, d)
    keys = attn.k_proj(normed).view(batch, length, heads, -1).transpose(1, 2)  # (B, H, T, d)
    scores = torch.matmul(query, keys.transpose(2, 3)) * attn.scale
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return weights[:, :, 0, 1:]


def tap_for(model: PreTrainedModel, method: str) -> VisionTap:
    """The tap a method that reads the vision tower runs with (install it): one `VisionCues` per
    image span. Refuses a tiling model (LLaVA-NeXT: an image span is several tiles and newline
    slots, which the authors' code, written for LLaVA-1.5, never ranks together)."""
    tap = VisionTap(model, method)
    if getattr(model.config, "image_grid_pinpoints", None) is not None:
        raise UnsupportedModel(
            f"{method} supports one grid of patches per image (LLaVA-1.5 style, as its authors' code); "
            f"{type(model).__name__} tiles each image (LLaVA-NeXT), which it does not support yet"
        )
    return tap
