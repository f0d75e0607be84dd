"""Pictures drawn with PIL alone: which patches a method kept (the paper's Fig. 2), accuracy
against FLOPs (Table 1 as a plot) and attention per image row (the attention shift)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import AsapError, UsageError

DROPPED_BRIGHTNESS = 0.2
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
INK, GRID = (40, 40, 40), (225, 225, 225)


def token_grid(tokens: int) -> tuple[int, int]:
    """(grid side, leading tokens to skip) of an image span laid out as one square grid, as
    LLaVA-1.5's is (a CLS token first under the "full" feature strategy)."""
    for skip in (0, 1) if tokens > 1 else ():
        side = math.isqrt(tokens - skip)
        if side * side == tokens - skip:
            return side, skip
    raise UsageError(
        f"the image span has {tokens} tokens, not one square grid of patches (a tiling model such as "
        "LLaVA-NeXT?); pictures per patch need a fixed-grid model (LLaVA-1.5 style)"
    )


def seen_region(size: tuple[int, int], image_processor) -> tuple[float, float, float, float]:
    """The box of the original image (left, top, right, bottom) that the vision tower sees: a
    centred square under CLIP's resize-shortest-edge + centre crop, else the whole image
    (resized to a square)."""
    width, height = size
    resize = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    if getattr(image_processor, "do_center_crop", False) and "shortest_edge" in resize and crop:
        scale = resize["shortest_edge"] / min(width, height)
        crop_w, crop_h = crop["width"] / scale, crop["height"] / scale
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return max(0.0, left), max(0.0, top), min(width, left + crop_w), min(height, top + crop_h)
    return 0.0, 0.0, float(width), float(height)


def kept_overlay(
    image: Image.Image, kept: Sequence[int], grid: int, region: tuple[float, float, float, float]
) -> Image.Image:
    """`image` with every patch of the `grid` x `grid` token grid (laid over `region`) darkened
    unless its token index (row-major) is in `kept`; what the tower never sees is darkened too."""
    dark = image.convert("RGB").point(lambda value: int(value * DROPPED_BRIGHTNESS))
    result = dark.copy()
    left, top, right, bottom = region
    cell_w, cell_h = (right - left) / grid, (bottom - top) / grid
    for index in kept:
        row, col = divmod(int(index), grid)
        box = (
            round(left + col * cell_w),
            round(top + row * cell_h),
            round(left + (col + 1) * cell_w),
            round(top + (row + 1) * cell_h),
        )
        result.paste(image.convert("RGB").crop(box), box[:2])
    return result


def kept_picture(image: Image.Image, image_processor, tokens: int, kept: Sequence[int]) -> Image.Image:
    """`image` as the model saw it under pruning: `kept` indexes the image span's `tokens`."""
    grid, skip = token_grid(tokens)
    patches = [index - skip for index in kept if index >= skip]
    return kept_overlay(image, patches, grid, seen_region(image.size, image_processor))


def kept_in_span(image: Image.Image, image_processor, span: tuple[int, int], result) -> Image.Image:
    """`image` as the model saw it after a generation (`result`) that pruned the image token span
    `span` ([start, end) positions): the kept positions mapped to the span's patches; every patch
    when nothing was pruned."""
    start, end = span
    kept = [position - start for position in (result.kept_positions or [range(start, end)])[0]]
    return kept_picture(image, image_processor, end - start, kept)


PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def picture_format(path: Path) -> str:
    """The image format a picture file's suffix names (never PNG bytes in a .jpg)."""
    format_ = PICTURE_FORMATS.get(Path(path).suffix.lower())
    if format_ is None:
        raise UsageError(f"cannot tell which picture format {path} should be: name it .png, .jpg or .webp")
    return format_


def check_picture_writable(path: Path, inputs: Sequence[Path] = ()) -> Path:
    path = check_writable(path, inputs)
    picture_format(path)
    return path


def check_writable(path: Path, inputs: Sequence[Path] = ()) -> Path:
    """Fail before long work where the file could not be written. An existing file is replaced,
    unless it is one of the run's `inputs`, which is never written over."""
    path = Path(path).expanduser()
    for source in inputs:
        if _same_file(path, Path(source).expanduser()):
            raise UsageError(f"refusing to write {path}: it is an input of this run; choose another file")
    if not path.parent.is_dir():
        raise AsapError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise AsapError(f"cannot write {path}: it is a folder")
    if path.exists() and not path.is_file():  # a device (/dev/full) or a pipe: written last, lost then
        raise AsapError(f"cannot write {path}: not a regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise AsapError(f"cannot write {path}: permission denied")
    try:  # the file is written beside its final place and renamed: the folder must take a file
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        raise AsapError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def save_picture(image: Image.Image, path: Path, inputs: Sequence[Path] = ()) -> Path:
    """Write `image` in the format its suffix names. Written whole to a temporary file first, so
    that a failed write (a full disk) never leaves half a file, nor spoils the one it replaces."""
    path = check_picture_writable(path, inputs)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            image.save(file, format=picture_format(path))  # our pictures are RGB: any format takes them
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise AsapError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


class _Axes:
    """A plot area with linear axes, in pixels of a white canvas."""

    def __init__(self, title: str, x_label: str, y_label: str, x_range, y_range, x_ticks=None, size=(640, 440)):
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.left, self.top, self.right, self.bottom = 70, 40, size[0] - 150, size[1] - 50
        self.x_range, self.y_range = _padded(*x_range), _padded(*y_range)
        self.draw.text((self.left, 12), title, fill=INK)
        self.draw.text(((self.left + self.right) // 2 - 3 * len(x_label), self.bottom + 28), x_label, fill=INK)
        self.draw.text((8, self.top - 24), y_label, fill=INK)
        fractions = (0, 0.25, 0.5, 0.75, 1)  # ticks span the data; the axes leave a margin
        for x_value in x_ticks or [x_range[0] + f * (x_range[1] - x_range[0]) for f in fractions]:
            x = self.x(x_value)
            self.draw.line((x, self.top, x, self.bottom), fill=GRID)
            self.draw.text((x - 12, self.bottom + 8), f"{x_value:.3g}", fill=INK)
        for y_value in [y_range[0] + f * (y_range[1] - y_range[0]) for f in fractions]:
            y = self.y(y_value)
            self.draw.line((self.left, y, self.right, y), fill=GRID)
            self.draw.text((8, y - 6), f"{y_value:.3g}", fill=INK)
        self.draw.rectangle((self.left, self.top, self.right, self.bottom), outline=INK)
        self.legend = 0

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / (high - low) * (self.right - self.left)

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.bottom - (value - low) / (high - low) * (self.bottom - self.top)

    def series(self, label: str, points: Sequence[tuple[float, float]], colour, marker: bool = True) -> None:
        pixels = [(self.x(x), self.y(y)) for x, y in sorted(points)]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=colour, width=2)
        for x, y in pixels if marker else []:
            self.draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        y = self.top + 8 + 18 * self.legend
        self.draw.rectangle((self.right + 12, y, self.right + 24, y + 10), fill=colour)
        self.draw.text((self.right + 30, y - 1), label, fill=INK)
        self.legend += 1


def _padded(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-9:
        return low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def accuracy_plot(series: dict[str, list[tuple[float, float]]], title: str) -> Image.Image:
    """Accuracy (%) against the FLOPs ratio (%), one line per method."""
    points = [point for values in series.values() for point in values]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    axes = _Axes(title, "FLOPs ratio (Eq. 8), %", "accuracy, %", (min(xs), max(xs)), (min(ys), max(ys)))
    for colour, (label, values) in zip(PALETTE * 2, series.items()):
        axes.series(label, values, colour)
    return axes.image


def row_attention_plot(curves: dict[str, list[float]], title: str) -> Image.Image:
    """Attention per image row (0 = top), one line per mask."""
    values = [value for curve in curves.values() for value in curve]
    rows = max(len(curve) for curve in curves.values())
    ticks = [*range(0, rows - 1, max(1, rows // 4)), rows - 1]  # whole rows
    axes = _Axes(title, "image row (0 = top)", "attention", (0, rows - 1), (0, max(values)), ticks)
    for colour, (label, curve) in zip(PALETTE, curves.items()):
        axes.series(label, list(enumerate(curve)), colour, marker=False)
    return axes.image
