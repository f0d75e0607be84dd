"""LLaVA checkpoints built from numbers alone: random weights, a character-level tokenizer, a
CLIP image processor and a LLaVA-style chat template. No download, no weights file.

Used by the `bench` preset (speed measured on a realistic shape without weights), by the tests
(tiny models saved with save_pretrained and loaded back through the real loading path) and as
the starting point of the bundled demo model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

# "USER: <image>\nquestion\nASSISTANT: answer</s>", LLaVA-1.5's layout.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


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


def word_level_tokenizer(words: list[str], pre_tokenizer, decoder, normalizer=None) -> PreTrainedTokenizerFast:
    """A tokenizer with one id per entry of SPECIAL_TOKENS + `words`, with the special tokens a
    LLaVA processor needs."""
    vocab = [*SPECIAL_TOKENS, *words]
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
        extra_special_tokens={"image_token": "<image>"},
    )


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Every printable ASCII character is a token, plus <s>, </s>, <pad>, <image> and newline."""
    characters = ["\n"] + [chr(c) for c in range(32, 127)]
    return word_level_tokenizer(characters, pre_tokenizers.Split("", behavior="isolated"), decoders.Fuse())


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
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    size = shape.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, LlavaProcessor(image_processor=images, **processor_kwargs(shape, tokenizer))


def save_llava(shape: LlavaShape, path: Path, seed: int = 0) -> Path:
    """build_llava, saved with save_pretrained (model and processor) into `path`."""
    model, processor = build_llava(shape, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
