"""Tiny random-weight LVLMs in the genuine transformers formats, saved with save_pretrained so
that tests load them through the same path as a hub checkpoint. No network."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

# A LLaVA-style template: "USER: <image>\nquestion\nASSISTANT: answer</s>"
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


def tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: every printable ASCII character is a token."""
    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "\n"] + [chr(c) for c in range(32, 127)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def text_config(tok, layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, so the key-head repetition is exercised
        vocab_size=len(tok),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def vision_config(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        projection_dim=32,
    )


def build_llava(path: Path, layers: int = 4) -> Path:
    """LLaVA-1.5 shape in miniature: 32 px images, 4 px patches -> 8 x 8 = 64 visual tokens."""
    tok = tokenizer()
    config = LlavaConfig(
        vision_config=vision_config(32),
        text_config=text_config(tok, layers),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return save_processor(LlavaProcessor, images, tok, path)


def build_llava_next(path: Path) -> Path:
    """LLaVA-NeXT in miniature: a 16 px base image plus tiles, with newline slots."""
    tok = tokenizer()
    config = LlavaNextConfig(
        vision_config=vision_config(16),
        text_config=text_config(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    return save_processor(LlavaNextProcessor, images, tok, path)


def save_processor(processor_class, images, tok, path: Path) -> Path:
    """The processor of a 4 px-patch CLIP tower whose CLS token is dropped ('default')."""
    processor_class(
        image_processor=images,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)
    return path
