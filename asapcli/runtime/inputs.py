"""User inputs -> model inputs: images from disk, the prompt, the model's own chat template."""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from ..errors import AsapError, UsageError

if TYPE_CHECKING:  # annotations only: reading the user's files must not wait for transformers' import
    from transformers import BatchFeature, ProcessorMixin


def check_readable(path: Path, what: str) -> None:
    """Raise AsapError unless `path` is a file to read: missing, a folder, or a named pipe or device
    that is not this process's standard input (opening a FIFO nobody writes to waits forever)."""
    if not path.exists():
        raise AsapError(f"{what} not found: {path}")
    if path.is_dir():
        raise AsapError(f"{what} path is a folder, not a file: {path}")
    if not path.is_file() and not is_stdin(path):
        raise AsapError(
            f"{what} {path} is not a regular file (a named pipe or a device); give a file, or pipe it into /dev/stdin"
        )


def is_stdin(path: Path) -> bool:
    """Whether `path` names this process's standard input (/dev/stdin, /proc/self/fd/0, a pipe's node)."""
    try:
        given, stdin = path.stat(), os.fstat(0)
    except OSError:
        return False
    return (given.st_dev, given.st_ino) == (stdin.st_dev, stdin.st_ino)


def load_image(path: str | Path) -> Image.Image:
    path = Path(path).expanduser()
    check_readable(path, "image")
    try:
        # Up to twice PIL's pixel limit an image opens with a warning; it is read like any other
        # (the processor resizes it), so the warning is not the user's business. Beyond: refused.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            # Upright as image viewers show it: phone photos are often stored sideways with an
            # EXIF orientation tag.
            return to_rgb(ImageOps.exif_transpose(image), path)
    except UnidentifiedImageError as error:
        raise AsapError(f"cannot read image {path}: not an image format PIL can open") from error
    except Image.DecompressionBombError as error:
        raise AsapError(
            f"cannot read image {path}: more pixels than PIL opens safely ({Image.MAX_IMAGE_PIXELS * 2:,} at most); "
            "scale it down first"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:  # PIL reports broken files with all three
        raise AsapError(f"cannot read image {path}: {error}") from error


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB. convert("RGB") clips high-bit-depth greyscale to white: scale it instead."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise AsapError(f"cannot read image {path}: 32-bit integer pixels; save it as 8- or 16-bit")
        image = Image.fromarray((values * 255 // 65535).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise AsapError(f"cannot read image {path}: floating-point pixels; save it as an 8- or 16-bit image")
    return image.convert("RGB")


def pattern_image(width: int = 336, height: int | None = None) -> Image.Image:
    """A deterministic picture for measuring without an image file: a colour gradient with a few
    shapes (what it shows does not change what a prefill costs; its size sets the visual tokens
    of a model that tiles, a preset's `pattern`)."""
    height = height or width
    ramp = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (ramp, ramp.rotate(90), ramp.rotate(180)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 8, width // 3, height // 3), fill=(220, 30, 30))
    draw.ellipse((width // 2, height // 2, 7 * width // 8, 7 * height // 8), fill=(30, 30, 220))
    return image


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise UsageError("the prompt is empty; ask something about the image")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not text, kept as lone surrogates by the reader
        raise AsapError("the input is not valid UTF-8 text; check the encoding of what you typed or piped") from None
    return prompt


def check_system(processor: ProcessorMixin, system: str | None, limit: int, flag: str = "--system") -> str | None:
    """A system prompt the model can take: no image placeholder, and room left in its context of
    `limit` tokens."""
    if system is None:
        return None
    try:
        check_text(processor, system)
    except UsageError as error:
        raise UsageError(f"{flag}: {error}") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = len(tokenizer(system, add_special_tokens=False)["input_ids"])
    if tokens >= limit:
        raise UsageError(f"{flag} is {tokens} tokens: the model's context of {limit} leaves no room for a question")
    return system


def check_text(processor: ProcessorMixin, text: str) -> str:
    """Refuse a model's image placeholder in the user's text: the processor would take it for an
    image of its own (and fail, or answer about the wrong picture)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_ids = [getattr(tokenizer, "image_token_id", None)]
    placeholders = {getattr(processor, name, None) for name in ("image_token", "video_token")}
    placeholders |= {tokenizer.convert_ids_to_tokens(i) for i in image_ids if isinstance(i, int)}
    for placeholder in sorted(filter(None, placeholders)):
        if placeholder in text:
            raise UsageError(
                f"the text contains {placeholder!r}, this model's image placeholder; "
                "remove it (add images with /image PATH in chat, or as files with asap run)"
            )
    return text


def opening(system: str | None) -> list[dict]:
    """The messages before the first turn: the system prompt, where one is given."""
    return [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []


def user_message(text: str, n_images: int) -> dict:
    """One user turn in the chat-template message format, images first (LLaVA's convention)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def build_inputs(processor: ProcessorMixin, messages: list[dict], images: list[Image.Image]) -> BatchFeature:
    """Render `messages` with the model's chat template and process text and images together."""
    return processor(images=images or None, text=prompt_text(processor, messages), return_tensors="pt")


def prompt_text(processor: ProcessorMixin, messages: list[dict]) -> str:
    """`messages` rendered with the model's own chat template, ready for the answer."""
    if getattr(processor, "chat_template", None) is None:
        raise AsapError("the model's processor has no chat template; asap needs one to build prompts")
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def build_batch_inputs(
    processor: ProcessorMixin, samples: list[tuple[str, Image.Image]], system: str | None = None
) -> BatchFeature:
    """Several (prompt, image) samples, each one user turn after the `system` prompt if given,
    left-padded into one batch (the padding side generate() needs)."""
    start = opening(system)
    texts = [prompt_text(processor, [*start, user_message(check_text(processor, prompt), 1)]) for prompt, _ in samples]
    images = [image for _, image in samples]
    return processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")


def expand_images(paths: list[str]) -> list[Path]:
    """Image arguments, a quoted glob pattern expanded (sorted); a pattern matching nothing is an error."""
    expanded: list[Path] = []
    for text in paths:
        if not text.strip():  # Path("") is the current folder
            raise UsageError("an image path is empty")
        if text.startswith(("http://", "https://")):
            raise UsageError(f"image URLs are not supported ({text}): download the image and give its file")
        # An existing file is that file, whatever its name holds ('photo[1].png'); only an
        # argument that names no file is a pattern.
        if not os.path.exists(os.path.expanduser(text)) and any(char in text for char in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(text)))
            if not matches:
                raise AsapError(f"no image matches {text!r}")
            expanded.extend(Path(match) for match in matches)
        else:
            expanded.append(Path(text))
    return expanded


def pair_samples(images: list[Path], prompts: list[str]) -> list[tuple[Path, str]]:
    """One prompt for every image, one image for every prompt, or as many of each, in order."""
    if not images:
        raise UsageError("give an image")
    if len(prompts) == 1:
        return [(image, prompts[0]) for image in images]
    if len(images) == 1:
        return [(images[0], prompt) for prompt in prompts]
    if len(images) != len(prompts):
        raise UsageError(
            f"{len(images)} images and {len(prompts)} prompts: give one prompt, one image, or as many of each"
        )
    return list(zip(images, prompts, strict=True))


@dataclass(frozen=True)
class Samples:
    """(image, prompt) pairs in the order given, and each image read once."""

    pairs: list[tuple[Path, str]]
    pictures: dict[Path, Image.Image]


def read_samples(
    arguments: list[str], images: list[str], prompts: list[str], read_prompt: Callable[[], str]
) -> Samples:
    """IMAGE... PROMPT (or, with `prompts`, all images), more `images`; a prompt '-' is
    `read_prompt()` (stdin). Every prompt is checked and every image read before the model loads."""
    if not prompts:
        if len(arguments) < 2 and not images:
            raise UsageError("give an image and a prompt: asap run IMAGE PROMPT")
        *arguments, prompt = arguments
        prompts = [prompt]
    prompts = [read_prompt() if prompt == "-" else prompt for prompt in prompts]
    for prompt in prompts:
        check_prompt(prompt)
        if _names_a_file(prompt):
            raise UsageError(
                f"the prompt {prompt!r} is a file: give the question after the images (asap run IMAGE PROMPT)"
            )
    pairs = pair_samples(expand_images([*arguments, *images]), prompts)
    return Samples(pairs, {path: load_image(path) for path, _ in pairs})


def _names_a_file(text: str) -> bool:
    try:
        return bool(text.strip()) and Path(text).expanduser().is_file()
    except (OSError, ValueError):  # too long, or a character no path holds: a question
        return False
