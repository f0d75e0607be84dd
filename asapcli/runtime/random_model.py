"""Models built from numbers alone: random weights, a character-level tokenizer, the family's
image processor and a LLaVA-style chat template. No download, no weights file.

`build_from_config`: any preset with a [config] table (the hub config.json's fields that shape
the model) built as transformers' own class, in the target dtype on the target device (no
float32 copy), optionally cut to its first N decoder layers; `--random-weights` and the `bench`
preset use it, so that the paper's shapes can be timed anywhere. `build_llava`: a LLaVA from a
handful of numbers, for the tests (tiny models saved with save_pretrained and loaded back
through the real loading path) and as the starting point of the bundled demo model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from ..errors import AsapError


def chat_template(image: str = "<image>") -> str:
    """LLaVA-1.5's layout, `USER: <image>\\nquestion\\nASSISTANT: answer</s>`, with `image` where an
    image goes (the placeholder the family's processor expands)."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image + "{{ '\\n' }}{% else %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}</s>{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = chat_template()


@dataclass(frozen=True)
class LlavaShape:
    """A Llama language model (the first five numbers, as in a preset's [architecture]) behind a
    CLIP-style tower of (image_size / patch_size)^2 patches, its CLS token dropped."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    image_size: int
    patch_size: int
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    max_positions: int = 4096

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def word_level_tokenizer(
    words: list[str], pre_tokenizer, decoder, normalizer=None, special: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer with one id per entry of SPECIAL_TOKENS + `words`, with the special tokens a
    LLaVA processor needs, and `special` (attribute name -> token) for other families'."""
    special = special or {}
    vocab = [*SPECIAL_TOKENS, *(token for token in special.values() if token not in SPECIAL_TOKENS), *words]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizer, decoder
    if normalizer is not None:
        backend.normalizer = normalizer
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", **special},
    )


def char_tokenizer(special: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Every printable ASCII character is a token, plus <s>, </s>, <pad>, <image>, newline and
    `special` (attribute name -> token)."""
    characters = ["\n"] + [chr(c) for c in range(32, 127)]
    isolated = pre_tokenizers.Split("", behavior="isolated")
    return word_level_tokenizer(characters, isolated, decoders.Fuse(), special=special)


def text_config(shape: LlavaShape, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=shape.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def vision_config(shape: LlavaShape, image_size: int | None = None) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=2 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=image_size or shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_hidden,
    )


def processor_kwargs(shape: LlavaShape, tokenizer: PreTrainedTokenizerFast) -> dict:
    """What a LLaVA-family processor needs besides its image processor."""
    return {
        "tokenizer": tokenizer,
        "patch_size": shape.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # the CLS token, dropped by "default"
        "chat_template": CHAT_TEMPLATE,
    }


def build_llava(
    shape: LlavaShape,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LlavaForConditionalGeneration and its processor (seeded), its weights made
    in `dtype` on `device` (no float32 copy first); the tokenizer must have <s>, </s>, <pad> and
    an <image> token (default: `char_tokenizer()`)."""
    tokenizer = tokenizer or char_tokenizer()
    config = LlavaConfig(
        vision_config=vision_config(shape),
        text_config=text_config(shape, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        # A shallow tower's second-to-last layer (LLaVA's default -2) would waste half of it.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    with made_in(dtype, device):
        model = LlavaForConditionalGeneration(config).eval()
    size = shape.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, LlavaProcessor(image_processor=images, **processor_kwargs(shape, tokenizer))


def save_llava(shape: LlavaShape, path: Path, seed: int = 0) -> Path:
    """build_llava, saved with save_pretrained (model and processor) into `path`."""
    model, processor = build_llava(shape, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@contextlib.contextmanager
def made_in(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Every tensor a model's constructor makes is made in `dtype` on `device`: no float32 copy
    on the host first (for bfloat16 weights, three times their memory at the peak)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default_dtype)


@dataclass(frozen=True)
class Family:
    """What a model family's processor needs beside the model's config: the special tokens its
    processor reads from the tokenizer (attribute name -> token), the config fields that hold
    their ids, and what its chat template writes for one image."""

    image_placeholder: str = "<image>"
    special_tokens: dict[str, str] = field(default_factory=dict)
    token_ids: dict[str, str] = field(default_factory=lambda: {"image_token_id": "<image>"})


FAMILIES = {
    "llava": Family(),
    "llava_next": Family(),
    "internvl": Family(
        "<IMG_CONTEXT>",
        {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"},
        {"image_token_id": "<IMG_CONTEXT>"},
    ),
    "qwen2_5_vl": Family(
        "<|vision_start|><|image_pad|><|vision_end|>",
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
         "vision_eos_token": "<|vision_end|>"},
        {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
         "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"},
    ),
}  # fmt: skip


def build_from_config(
    table: dict,
    images: dict | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    layers: int | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A preset's [config] table (a hub config.json's fields: model_type, text_config,
    vision_config, ...) built as transformers' own model class with random weights (seeded),
    made in `dtype` on `device`; its language model cut to its first `layers` decoder layers
    when given. The processor: the family's, its image processor given `images` (the preset's
    [processor] table), with a character-level tokenizer whose special-token ids replace the
    checkpoint's in the config. A text_config without vocab_size takes the tokenizer's."""
    config, tokenizer = random_config(table, layers)
    processor = family_processor(config, tokenizer, images or {})  # first: a missing torchvision fails at once
    torch.manual_seed(seed)
    with made_in(dtype, device):
        model = AutoModelForImageTextToText.from_config(config).eval()
    return model, processor


def random_config(table: dict, layers: int | None = None) -> tuple[PretrainedConfig, PreTrainedTokenizerFast]:
    """The transformers config of a preset's [config] table, cut to `layers` decoder layers
    when given, and the character-level tokenizer whose special-token ids it holds."""
    table = dict(table)
    model_type = table.pop("model_type", None)
    if model_type not in FAMILIES:
        raise AsapError(f"cannot build a {model_type!r} model from numbers; known: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    tokenizer = char_tokenizer(family.special_tokens)
    text = {"vocab_size": len(tokenizer), **table.pop("text_config")}
    text.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    text.update(eos_token_id=tokenizer.eos_token_id)
    if layers is not None:
        text["num_hidden_layers"] = layers
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in family.token_ids.items()}
    return AutoConfig.for_model(model_type, text_config=text, **table, **ids), tokenizer


def family_processor(config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, images: dict) -> ProcessorMixin:
    """The processor of `config`'s family around `tokenizer`, its image processor sized by the
    vision config and given `images` (keyword arguments of the image processor)."""
    vision, template = config.vision_config, chat_template(FAMILIES[config.model_type].image_placeholder)
    if config.model_type in ("llava", "llava_next"):
        size = {"shortest_edge": vision.image_size}, {"height": vision.image_size, "width": vision.image_size}
        llava = {
            "tokenizer": tokenizer,
            "patch_size": vision.patch_size,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "num_additional_image_tokens": 1,  # the CLS token
            "chat_template": template,
        }
        if config.model_type == "llava":
            return LlavaProcessor(
                image_processor=CLIPImageProcessorPil(size=size[0], crop_size=size[1], **images), **llava
            )
        grid = LlavaNextImageProcessorPil(
            size=size[0], crop_size=size[1], image_grid_pinpoints=config.image_grid_pinpoints, **images
        )
        return LlavaNextProcessor(image_processor=grid, **llava)
    # Qwen2.5-VL's and InternVL's processors build a video processor, which needs torchvision:
    # an ImportError here says so, as for a checkpoint of theirs.
    if config.model_type == "internvl":
        from transformers import InternVLProcessor, InternVLVideoProcessor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        height, width = vision.image_size
        tiles = GotOcr2ImageProcessorPil(size={"height": height, "width": width}, crop_to_patches=True, **images)
        per_tile = (height // vision.patch_size[0]) * (width // vision.patch_size[1]) * config.downsample_ratio**2
        return InternVLProcessor(
            image_processor=tiles,
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(),
            image_seq_length=int(per_tile),
            chat_template=template,
        )
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patches = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        **images,
    )
    return Qwen2_5_VLProcessor(
        image_processor=patches, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=template
    )
