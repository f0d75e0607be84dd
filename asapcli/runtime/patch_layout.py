"""Where each visual token of an image span sits on the original image: one grid of patches
(LLaVA-1.5 style, through the processor's resize and centre crop), or LLaVA-NeXT's base image and
its tiles (through the processor's own choice of tiling and the model's unpadding). No drawing
here: figures.py draws what this lays out."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError

Box = tuple[float, float, float, float]  # left, top, right, bottom, in pixels of the original image


@dataclass(frozen=True)
class PatchGrid:
    """`rows` x `cols` patches of a span covering `box` of the image; the patch at (row, col) is
    span index `first + row * stride + col` (stride cols + 1 where a newline slot ends each row)."""

    name: str
    first: int
    rows: int
    cols: int
    stride: int
    box: Box

    def index(self, row: int, col: int) -> int:
        return self.first + row * self.stride + col

    def place(self, index: int) -> tuple[int, int] | None:
        """(row, col) of span index `index`; None where it is not one of this grid's patches."""
        row, col = divmod(index - self.first, self.stride)
        return (row, col) if 0 <= row < self.rows and col < self.cols and index >= self.first else None

    def patch_box(self, row: int, col: int, rows: int = 1, cols: int = 1) -> Box:
        """The box of `rows` x `cols` patches from (row, col), in image pixels."""
        left, top, right, bottom = self.box
        width, height = (right - left) / self.cols, (bottom - top) / self.rows
        return left + col * width, top + row * height, left + (col + cols) * width, top + (row + rows) * height


@dataclass(frozen=True)
class SpanLayout:
    """Every grid of one image span of `tokens` tokens; tokens in no grid (a CLS token, LLaVA-NeXT's
    newline slots) are `extra`, which `extra_name` names."""

    tokens: int
    grids: list[PatchGrid]
    extra_name: str = "[CLS]"

    def locate(self, index: int) -> tuple[int, int, int] | None:
        """(grid number, row, col) of span index `index`; None for a token in no grid."""
        for number, grid in enumerate(self.grids):
            place = grid.place(index)
            if place is not None:
                return number, *place
        return None

    @property
    def extra(self) -> list[int]:
        return [index for index in range(self.tokens) if self.locate(index) is None]


def span_layout(processor, image_size: tuple[int, int], tokens: int) -> SpanLayout:
    """The layout of an image of `image_size` (width, height) whose span holds `tokens` tokens, as
    `processor` (the model's AutoProcessor) prepared it. A model whose image tokens are not laid
    out as LLaVA-1.5's or LLaVA-NeXT's is a UsageError."""
    image_processor = getattr(processor, "image_processor", processor)
    if getattr(image_processor, "image_grid_pinpoints", None) and hasattr(processor, "_get_unpadded_features"):
        layout = _llava_next(processor, image_processor, image_size)
    else:
        layout = _single_grid(image_processor, image_size, tokens)
    if layout is None or layout.tokens != tokens:
        raise UsageError(
            f"cannot tell where the image's {tokens} tokens sit on it: pictures per patch need image tokens laid "
            "out as LLaVA-1.5's (one square grid) or LLaVA-NeXT's (a base image and tiles)"
        )
    return layout


def _single_grid(image_processor, image_size: tuple[int, int], tokens: int) -> SpanLayout | None:
    """One square grid (after a CLS token under the "full" feature strategy) over what the
    vision tower sees of the image."""
    for skip in (0, 1) if tokens > 1 else ():
        side = math.isqrt(tokens - skip)
        if side * side == tokens - skip:
            return SpanLayout(
                tokens, [PatchGrid("image", skip, side, side, side, seen_region(image_size, image_processor))]
            )
    return None


def seen_region(size: tuple[int, int], image_processor) -> Box:
    """The box of the original image that the vision tower sees: a centred square under CLIP's
    resize-shortest-edge + centre crop, else the whole image (resized to a square)."""
    width, height = size
    resize = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    if getattr(image_processor, "do_center_crop", False) and "shortest_edge" in resize and crop:
        scale = resize["shortest_edge"] / min(width, height)
        crop_w, crop_h = crop["width"] / scale, crop["height"] / scale
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return max(0.0, left), max(0.0, top), min(width, left + crop_w), min(height, top + crop_h)
    return 0.0, 0.0, float(width), float(height)


def _llava_next(processor, image_processor, image_size: tuple[int, int]) -> SpanLayout | None:
    """LLaVA-NeXT's span: the base image (the whole image squeezed to one tile), then the tiles'
    patches with the padding rows or columns cut (the model's unpad_image) and a newline slot
    after every row. Counted as the processor counts its image tokens."""
    from transformers.image_processing_utils import select_best_resolution

    width, height = image_size
    crop = getattr(image_processor, "crop_size", None) or {}
    patch = getattr(processor, "patch_size", None)
    if not patch or "height" not in crop:
        return None
    tile_h, tile_w = crop["height"], crop["width"]
    best_h, best_w = select_best_resolution([height, width], image_processor.image_grid_pinpoints)
    patches_h, patches_w = tile_h // patch, tile_w // patch
    canvas_rows, canvas_cols = patches_h * (best_h // tile_h), patches_w * (best_w // tile_w)
    unpadded, rows = processor._get_unpadded_features(
        height, width, patches_h, patches_w, best_h // tile_h, best_w // tile_w
    )
    cols = unpadded // rows if rows else 0
    base = patches_h * patches_w + processor.num_additional_image_tokens
    base -= 1 if processor.vision_feature_select_strategy == "default" else 0
    skip = base - patches_h * patches_w
    # The image fills the tiles' canvas in one direction and is centred in the other; the kept
    # rows (or columns) are the middle ones. Their box in image pixels:
    if width / height > canvas_cols / canvas_rows:  # as unpad_image decides which way to cut
        exact = height * canvas_cols / width  # the image's height in patch rows
        offset = ((canvas_rows - rows) / 2 - (canvas_rows - exact) / 2) * height / exact
        box = (0.0, offset, float(width), offset + rows * height / exact)
    else:
        exact = width * canvas_rows / height
        offset = ((canvas_cols - cols) / 2 - (canvas_cols - exact) / 2) * width / exact
        box = (offset, 0.0, offset + cols * width / exact, float(height))
    grids = [PatchGrid("base image", skip, patches_h, patches_w, patches_w, (0.0, 0.0, float(width), float(height)))]
    if rows and cols:  # an image thinner than a patch row (or column) of the canvas leaves its tiles none
        grids.append(PatchGrid("tiles", base, rows, cols, cols + 1, box))
    return SpanLayout(base + rows * (cols + 1), grids, "row ends")
