"""User inputs -> model inputs: images from disk, the prompt, the model's own chat template."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

from .errors import AsapError, UsageError


def load_image(path: str | Path) -> Image.Image:
    path = Path(path).expanduser()
    if not path.exists():
        raise AsapError(f"image not found: {path}")
    if path.is_dir():
        raise AsapError(f"image path is a folder, not a file: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError as error:
        raise AsapError(f"cannot read image {path}: not an image format PIL can open") from error
    except OSError as error:
        raise AsapError(f"cannot read image {path}: {error}") from error


def pattern_image(size: int = 336) -> Image.Image:
    """A deterministic picture for measuring without an image file: a colour gradient with a few
    shapes (what it shows does not change what a prefill costs)."""
    ramp = Image.linear_gradient("L").resize((size, size))
    image = Image.merge("RGB", (ramp, ramp.rotate(90), ramp.rotate(180)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 8, size // 8, size // 3, size // 3), fill=(220, 30, 30))
    draw.ellipse((size // 2, size // 2, 7 * size // 8, 7 * size // 8), fill=(30, 30, 220))
    return image


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise UsageError("the prompt is empty; ask something about the image")
    return prompt


def user_message(text: str, n_images: int) -> dict:
    """One user turn in the chat-template message format, images first (LLaVA's convention)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def build_inputs(processor: ProcessorMixin, messages: list[dict], images: list[Image.Image]) -> BatchFeature:
    """Render `messages` with the model's chat template and process text and images together."""
    if getattr(processor, "chat_template", None) is None:
        raise AsapError("the model's processor has no chat template; asap needs one to build prompts")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images or None, text=text, return_tensors="pt")
