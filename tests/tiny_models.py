"""Tiny random-weight LVLMs in the genuine transformers formats, saved with save_pretrained so
that tests load them through the same path as a hub checkpoint. No network."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from transformers import (
    BatchFeature,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from asapcli.engine.session import PruningSession, attached
from asapcli.runtime.random_model import (
    LlavaShape,
    char_tokenizer,
    processor_kwargs,
    save_llava,
    text_config,
    vision_config,
)

# LLaVA-1.5 in miniature: 32 px images, 4 px patches -> 8 x 8 = 64 visual tokens; GQA (4 query
# heads, 2 key/value heads) so that the key-head repetition is exercised.
TINY = LlavaShape(
    layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, image_size=32, patch_size=4, vision_hidden=32
)
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


# Qwen2.5-VL and InternVL: transformers builds their processors with a video processor, which
# needs torchvision (not installable here without CUDA). The model files are real; the inputs
# are laid out as their processors lay them out (`qwen_inputs`, `internvl_inputs`).
QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def _tokenizer_with(extra: tuple[str, ...]):
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    return tokenizer


def _text_config(tokenizer, model_type: str, **rope) -> dict:
    return dict(
        model_type=model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **rope,
    )  # fmt: skip


def build_qwen2_5_vl(path: Path) -> Path:
    """Qwen2.5-VL in miniature: 4 px patches merged 2 x 2, M-RoPE over (time, height, width)."""
    tokenizer = _tokenizer_with(QWEN_TOKENS)
    start, end, pad = tokenizer.convert_tokens_to_ids(list(QWEN_TOKENS))
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16 / 2
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, "qwen2_5_vl_text", rope_parameters=rope),
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64, "patch_size": 4,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16, "fullatt_block_indexes": [1],
        },
        image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end,
        video_token_id=tokenizer.unk_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    qwen_image_processor().save_pretrained(path)
    return path


def qwen_image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=4096)


def qwen_inputs(tokenizer, images, prompt: str) -> BatchFeature:
    """What Qwen2.5-VL's processor makes of one user turn: each image as <|vision_start|>, one
    <|image_pad|> per merged 2 x 2 patch group, <|vision_end|>; mm_token_type_ids 1 on the pads."""
    return qwen_batch(tokenizer, [(images, prompt)])


def qwen_batch(tokenizer, samples: list[tuple[list, str]]) -> BatchFeature:
    """qwen_inputs for several (images, prompt) samples, left-padded into one batch."""
    pixels = qwen_image_processor()(images=[image for images, _ in samples for image in images], return_tensors="pt")
    pads = iter(int(grid.prod()) // 4 for grid in pixels["image_grid_thw"])
    texts = []
    for images, prompt in samples:
        vision = "".join(f"<|vision_start|>{'<|image_pad|>' * next(pads)}<|vision_end|>" for _ in images)
        texts.append(f"USER: {vision}{prompt}\nASSISTANT:")
    ids = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    mm_types = (ids["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    return BatchFeature({**ids, **pixels, "mm_token_type_ids": mm_types})


INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
INTERNVL_TILE_TOKENS = 16  # (32 px / 4 px)^2 patches, pixel-shuffled by 0.5 in each direction


def build_internvl(path: Path) -> Path:
    """InternVL in miniature: 32 px tiles (up to 4 plus a thumbnail) of 16 tokens each, all tiles
    of an image in one <img>...</img> run; a Qwen2 language model, as InternVL3's."""
    tokenizer = _tokenizer_with(INTERNVL_TOKENS)
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": [32, 32], "patch_size": [4, 4],
        },
        text_config=_text_config(tokenizer, "qwen2"),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=INTERNVL_TILE_TOKENS, downsample_ratio=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    InternVLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # What a checkpoint's processor files say (InternVLProcessor itself cannot be built here).
    internvl_image_processor().save_pretrained(path)
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": INTERNVL_TILE_TOKENS}
    (path / "processor_config.json").write_text(json.dumps(processor))
    return path


def internvl_image_processor() -> GotOcr2ImageProcessorPil:
    return GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4)


def internvl_inputs(tokenizer, images, prompt: str) -> BatchFeature:
    """What InternVL's processor makes of one user turn: per image, <img>, 16 <IMG_CONTEXT> per
    tile, </img>."""
    pixels = internvl_image_processor()(images=images, return_tensors="pt")
    vision = "".join(f"<img>{'<IMG_CONTEXT>' * INTERNVL_TILE_TOKENS * int(n)}</img>" for n in pixels["num_patches"])
    ids = tokenizer(f"USER: {vision}\n{prompt}\nASSISTANT:", return_tensors="pt")
    return BatchFeature({**ids, "pixel_values": pixels["pixel_values"]})


@contextmanager
def pruned_by(model, plans):
    """The next forward call of `model` (a generate()'s prefill) pruned by `plans` made by hand (one
    per row, or one; None: nothing), through a bare session: yields the session, whose `prefills`
    say what the call did."""
    session = PruningSession(None, model.config.get_text_config())
    with attached(model, session):
        session.plan_next(plans)
        yield session
