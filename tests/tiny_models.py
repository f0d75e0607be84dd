"""Tiny random-weight LVLMs in the genuine transformers formats, saved with save_pretrained so
that tests load them through the same path as a hub checkpoint. No network."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from asapcli.random_model import LlavaShape, char_tokenizer, processor_kwargs, save_llava, text_config, vision_config

# LLaVA-1.5 in miniature: 32 px images, 4 px patches -> 8 x 8 = 64 visual tokens; GQA (4 query
# heads, 2 key/value heads) so that the key-head repetition is exercised.
TINY = LlavaShape(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, image_size=32, patch_size=4, vision_hidden=32)
PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def build_llava(path: Path, layers: int = 4) -> Path:
    return save_llava(replace(TINY, layers=layers), path)


def build_llava_next(path: Path) -> Path:
    """LLaVA-NeXT in miniature: a 16 px base image plus tiles, with newline slots."""
    shape = replace(TINY, image_size=16)
    tokenizer = char_tokenizer()
    config = LlavaNextConfig(
        vision_config=vision_config(shape),
        text_config=text_config(shape, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS,
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS
    )
    LlavaNextProcessor(image_processor=images, **processor_kwargs(shape, tokenizer)).save_pretrained(path)
    return path
