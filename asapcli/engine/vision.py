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

Each item of the tower's batch (an image of LLaVA-1.5, the base image or a tile of LLaVA-NeXT) is
one `VisionCues`, in the tower's batch order, which is the order the model places image features.
A tiling model's image is one `TiledCues`: its items and where each of their patches reaches the
image span, as the model's own `pack_image_features` lays them out (unpadding, newline slots)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import UnsupportedModel
from .methods.tower import TiledCues


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


class Tiling:
    """How a tiling model (LLaVA-NeXT) cuts an image into tower items and packs their patches into
    the image span: transformers' own functions, applied to patch numbers instead of features."""

    def __init__(self, model: PreTrainedModel, method: str):
        config = model.config
        self.inner = getattr(model, "model", model)
        if not hasattr(self.inner, "pack_image_features"):
            raise UnsupportedModel(
                f"{method} needs to know where each tile's patches land in the image span; "
                f"{type(model).__name__} tiles its images without LLaVA-NeXT's pack_image_features"
            )
        self.pinpoints = [list(point) for point in config.image_grid_pinpoints]
        self.tile = config.vision_config.image_size
        tiles = max(math.ceil(height / self.tile) * math.ceil(width / self.tile) for height, width in self.pinpoints)
        self.most_items = 1 + tiles

    def count(self, size: torch.Tensor) -> int:
        """How many tower items (base image and tiles) an image of `size` (height, width) is."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches(size, self.pinpoints, self.tile)

    def image(self, cues: list[VisionCues], image_size: torch.Tensor) -> TiledCues:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        patches = cues[0].features.shape[0]
        numbers = torch.arange(len(cues) * patches, dtype=torch.float64).view(len(cues), patches, 1)
        newline = torch.tensor([-1.0], dtype=torch.float64)
        (packed,), _ = self.inner.pack_image_features([numbers], image_size[None], "default", image_newline=newline)
        grid = get_anyres_image_grid_shape(image_size, self.pinpoints, self.tile)
        return TiledCues(cues, packed[:, 0].long(), tuple(grid), self.most_items)


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
    the tower gave since the model last began encoding images, in order. `needs`: what
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
        self.tiling = Tiling(model, method) if getattr(config, "image_grid_pinpoints", None) else None
        self.inner = getattr(model, "model", model)
        if not hasattr(self.inner, "get_image_features"):
            raise UnsupportedModel(f"{method} reads the images a model encodes; {name} has no get_image_features")
        self.cues: list[VisionCues] = []
        self.sizes: list[torch.Tensor] = []  # a tiling model's (height, width) of each image encoded
        self.encoded = 0  # images in the last encode
        self._hooks: list = []

    def install(self) -> VisionTap:
        self._hooks = [self.layer.register_forward_hook(self._capture, with_kwargs=True)]
        if "last_qk" in self.needs:  # registered after: on the same layer it runs second
            self._hooks.append(self.last.register_forward_hook(self._capture_last, with_kwargs=True))
        self._watch()
        return self

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.inner.__dict__.pop("get_image_features", None)  # the model's own method again

    def _watch(self) -> None:
        """Each time the model encodes images (generate() before its first forward, a direct
        forward inside it), start afresh: what the tower gives from then on is those images' (a
        video's frames, encoded after, come last), and a tiling model's image sizes, which decide
        its tiles and which the tower never sees, are noted."""
        encode = type(self.inner).get_image_features.__get__(self.inner)

        @functools.wraps(encode)  # the same signature: generate() picks its arguments by it
        def encoding(pixel_values, *args, **kwargs):
            self.cues, self.encoded = [], len(pixel_values)
            if self.tiling is not None:  # LLaVA-NeXT's get_image_features(pixel_values, image_sizes, ...)
                sizes = kwargs["image_sizes"] if "image_sizes" in kwargs else args[0]
                self.sizes = [torch.as_tensor(size).cpu() for size in sizes]
                self.encoded = len(self.sizes)
            return encode(pixel_values, *args, **kwargs)

        self.inner.get_image_features = encoding

    def image(self, number: int, images: int) -> VisionCues | TiledCues:
        """What the tower gave for image `number` of the `images` images the model last encoded:
        its cues on a single grid, its TiledCues on a tiling model."""
        if images != self.encoded:
            raise UnsupportedModel(
                f"this call has {images} image spans where the model encoded {self.encoded} images (generate()'s "
                "num_return_sequences and num_beams repeat images after encoding them); generate one sequence per "
                "prompt with a method that reads the vision tower"
            )
        counts = [1] * images if self.tiling is None else [self.tiling.count(size) for size in self.sizes]
        first = sum(counts[:number])
        items = self.cues[first : first + counts[number]]
        return items[0] if self.tiling is None else self.tiling.image(items, self.sizes[number])

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
