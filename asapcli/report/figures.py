"""The figures, drawn with matplotlib: which tokens a method kept and why (the paper's Fig. 2, one
method or several side by side), accuracy against FLOPs (Table 1 as a plot) and where the
scoring queries' attention goes under each mask (the attention shift).

Each figure is built in two steps: a plain description of what is drawn (`KeptView`,
`AccuracyPoint`s, `AttentionView`: which patch in which role, the legend's counts, the points),
which the tests inspect, then `draw_*` turns it into a matplotlib Figure. matplotlib is imported
inside the drawing functions only (the Agg canvas: no display, no pyplot state), so that the
commands that only check an output file start fast.
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.methods import ANCHOR, KEPT, METHODS, POOLED, ROLES, SELECTED
from ..errors import AsapError, UsageError
from ..runtime.patch_layout import Box, SpanLayout

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

# Figure files by their suffix; rasters at a modest dpi keep a committed figure small.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
DPI = 100
MIN_SHORT_SIDE = 384  # pixels: a 96 px image is upscaled to this, nearest-neighbour (its patches stay sharp)
# pixels: a large photo (or a long panorama) is drawn no longer than this, so that a figure's
# size and memory stay those of a figure whatever the input (an 8000 px photo made 6 GB ones)
MAX_LONG_SIDE = 1024

DROPPED, ABSORBED = "dropped", "absorbed"  # a patch's state beside the kept roles
# Each role's colour is the methods' (engine.methods.ROLES, Okabe-Ito); a patch merged into an
# anchor takes the anchor's, a dropped one is grey.
COLOURS = {**{name: role.colour for name, role in ROLES.items()}, ABSORBED: ROLES[ANCHOR].colour, DROPPED: "#555555"}
STATE_LABELS = {ABSORBED: "merged into a kept token (dashed)", DROPPED: "dropped (dimmed)"}
DIM_TOWARDS, DIM_KEEPS = (24, 24, 24), 0.3  # a dropped patch: 30% of itself over near-black, still readable
SERIES = ["#0072B2", "#D55E00"]  # the attention profile's two lines: causal, SG-BiMask


def role_label(role: str, method: str) -> str:
    """What the legend calls a role (or a patch's state), for `method`: the method's own label
    for a role it gives, else the role's first declaration's."""
    if role in STATE_LABELS:
        return STATE_LABELS[role]
    own = METHODS[method].role_label(role) if method in METHODS else None
    return own or ROLES[role].label


# ---- kept tokens -------------------------------------------------------------------------


@dataclass(frozen=True)
class GridView:
    """One grid of patches as drawn: each patch's state (`states[row][col]`: a kept role,
    ABSORBED or DROPPED) and the outlines, (role, box in image pixels): one per kept patch, one
    per pooled cell, one per patch an anchor absorbed (role ABSORBED, the anchor's colour)."""

    name: str
    box: Box
    states: list[list[str]]
    outlines: list[tuple[str, Box]] = field(default_factory=list)

    def cells_in(self, state: str) -> list[tuple[int, int]]:
        return [(r, c) for r, row in enumerate(self.states) for c, value in enumerate(row) if value == state]


@dataclass(frozen=True)
class KeptView:
    """What a kept-tokens figure shows: the title, every grid, and the legend (label, count) in
    order: kept tokens by role, then the patches merged away and dropped. `note` counts the kept
    tokens that sit on no patch (a CLS token, LLaVA-NeXT's newline slots)."""

    title: str
    method: str
    grids: list[GridView]
    legend: list[tuple[str, str, int]]  # (role, label, count)
    note: str = ""


def kept_view(
    layout: SpanLayout,
    kept: Sequence[int] | None,
    roles: Sequence[str] | None,
    absorbed: Sequence[Sequence[int]] | None,
    title: str,
    method: str,
) -> KeptView:
    """The description of one span's figure: `kept` span indices (None: nothing was pruned, every
    token kept), each one's role and the span indices it absorbed (the engine's, from the plan)."""
    if kept is None:
        kept, roles, absorbed = range(layout.tokens), [KEPT] * layout.tokens, [[] for _ in range(layout.tokens)]
    roles = list(roles) if roles is not None else [SELECTED] * len(kept)
    absorbed = list(absorbed) if absorbed is not None else [[] for _ in kept]
    painter = _Painter(layout)
    for index, role, sources in zip(kept, roles, absorbed, strict=True):
        painter.token(index, role, sources)
    grids = [
        GridView(g.name, g.box, s, o) for g, s, o in zip(layout.grids, painter.states, painter.outlines, strict=True)
    ]
    note = ""
    if painter.off_grid and len(layout.extra) > 0:
        kept_off = sum(painter.off_grid.values())
        note = f"also kept: {kept_off} of the {len(layout.extra)} tokens on no patch ({layout.extra_name})"
    return KeptView(title, method, grids, _legend_entries(layout.tokens, kept, roles, absorbed, method), note)


class _Painter:
    """Each patch's state and the outlines of one span's figure, filled in token by token."""

    def __init__(self, layout: SpanLayout):
        self.layout = layout
        self.states = [[[DROPPED] * grid.cols for _ in range(grid.rows)] for grid in layout.grids]
        self.outlines: list[list[tuple[str, Box]]] = [[] for _ in layout.grids]
        self.off_grid: Counter[str] = Counter()

    def mark(self, index: int, state: str) -> tuple[int, int, int] | None:
        place = self.layout.locate(index)
        if place is not None:
            number, row, col = place
            if state != ABSORBED or self.states[number][row][col] == DROPPED:  # a kept token is never shown as merged
                self.states[number][row][col] = state
        return place

    def token(self, index: int, role: str, sources: Sequence[int]) -> None:
        """A kept token in its role, and the patches whose states it took in."""
        place = self.mark(index, role)
        if place is None:
            self.off_grid[role] += 1
            return
        number, row, col = place
        grid = self.layout.grids[number]
        if role == POOLED:  # the cell: the kept token and the patches averaged into it, one box
            places = [place] + [self.mark(source, POOLED) for source in sources]
            rows = [p[1] for p in places if p is not None]
            cols = [p[2] for p in places if p is not None]
            box = grid.patch_box(min(rows), min(cols), max(rows) - min(rows) + 1, max(cols) - min(cols) + 1)
            self.outlines[number].append((POOLED, box))
            return
        if role != KEPT:
            self.outlines[number].append((role, grid.patch_box(row, col)))
        for source in sources:
            at = self.mark(source, ABSORBED)
            if at is not None and self.states[at[0]][at[1]][at[2]] == ABSORBED:
                self.outlines[at[0]].append((ABSORBED, self.layout.grids[at[0]].patch_box(*at[1:])))


def _legend_entries(
    tokens: int, kept: Sequence[int], roles: list[str], absorbed: list, method: str
) -> list[tuple[str, str, int]]:
    """(role, label, count) of the kept roles in ROLES' order, the patches merged into kept tokens
    right after the anchors (each once, however many tokens took it in: PruMerge+'s overlap; a
    kept patch is never counted as merged), then the dropped ones (none where cells pooled every
    patch)."""
    counts = Counter(roles)
    sources = {source for role, group in zip(roles, absorbed) if role != POOLED for source in group}
    merged = len(sources - set(kept))
    order = [state for role in ROLES for state in ((role, ABSORBED) if role == ANCHOR else (role,))]
    shown = {**counts, ABSORBED: merged}
    legend = [(role, role_label(role, method), shown[role]) for role in order if shown.get(role)]
    pooled_away = sum(len(group) for role, group in zip(roles, absorbed) if role == POOLED)
    dropped = tokens - len(roles) - merged - pooled_away
    if dropped > 0 and not counts[POOLED]:
        legend.append((DROPPED, role_label(DROPPED, method), dropped))
    return legend


def kept_title(model: str, method: str, k: int | None, layer: int | None, kept: int, tokens: int) -> str:
    if not METHODS[method].prunes or kept >= tokens:
        return f"{model}: {method}, every one of {tokens} visual tokens kept"
    where = "before the language model" if layer == 0 else f"L={layer}"
    return f"{model}: {method}, k={k}, {where}: kept {kept} of {tokens} visual tokens"


def _upscaled(image: Image.Image):
    """The image as an RGB array and the factor it was scaled by: enlarged by a whole factor
    (nearest neighbour) to at least MIN_SHORT_SIDE pixels on its short side, no further than
    MAX_LONG_SIDE on its long side; a larger image reduced to MAX_LONG_SIDE (the figure shows no
    more, and matplotlib would hold every pixel of a photo several times over)."""
    import numpy as np
    from PIL import Image as PILImage

    image = image.convert("RGB")
    if max(image.size) > MAX_LONG_SIDE:
        factor = MAX_LONG_SIDE / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        return np.asarray(image.resize(size, PILImage.Resampling.BOX)), factor
    factor = max(1, min(math.ceil(MIN_SHORT_SIDE / min(image.size)), MAX_LONG_SIDE // max(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), PILImage.Resampling.NEAREST)
    return np.asarray(image), factor


def _panel_size(pixels, longest: int, short: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels at which to draw `pixels`: as they are, or smaller, so that the
    short side is at most `short` and the long side at most `longest`."""
    height, width = pixels.shape[:2]
    scale = min(1.0, longest / max(width, height), (short or min(width, height)) / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _composite(pixels, factor: float, grid: GridView):
    """The upscaled image with every patch that did not go on (dropped, merged away, or never
    seen by the tower) dimmed."""
    import numpy as np

    lit = np.zeros(pixels.shape[:2], dtype=bool)
    rows, cols = len(grid.states), len(grid.states[0])
    left, top, right, bottom = grid.box
    for r in range(rows):
        for c in range(cols):
            if grid.states[r][c] in (DROPPED, ABSORBED):
                continue
            x0 = left + c * (right - left) / cols
            y0 = top + r * (bottom - top) / rows
            x1, y1 = x0 + (right - left) / cols, y0 + (bottom - top) / rows
            lit[max(0, round(y0 * factor)) : round(y1 * factor), max(0, round(x0 * factor)) : round(x1 * factor)] = True
    dimmed = pixels * DIM_KEEPS + np.array(DIM_TOWARDS) * (1 - DIM_KEEPS)
    return np.where(lit[..., None], pixels, dimmed).astype(np.uint8)


def _draw_grid(axes, pixels, factor: float, grid: GridView) -> None:
    """One panel: the image with its patch grid, dimmed where tokens were lost, each kept patch
    outlined in its role's colour."""
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    height, width = pixels.shape[:2]
    axes.imshow(
        _composite(pixels, factor, grid), extent=(0, width / factor, height / factor, 0), interpolation="nearest"
    )
    rows, cols = len(grid.states), len(grid.states[0])
    left, top, right, bottom = grid.box
    line = {"colors": "white", "linewidths": 0.4, "alpha": 0.35}
    axes.vlines([left + c * (right - left) / cols for c in range(cols + 1)], top, bottom, **line)
    axes.hlines([top + r * (bottom - top) / rows for r in range(rows + 1)], left, right, **line)
    inset = {POOLED: 0.12 * (right - left) / cols}  # overlapping cells drawn a little inside their bounds, apart
    for role in (ABSORBED, *(role for role in ROLES if role != KEPT)):  # merged patches under the rest
        d = inset.get(role, 0.0)
        boxes = [
            Rectangle((b[0] + d, b[1] + d), b[2] - b[0] - 2 * d, b[3] - b[1] - 2 * d)
            for r, b in grid.outlines
            if r == role
        ]
        if boxes:
            dashed, cell = role == ABSORBED, role == POOLED
            axes.add_collection(
                PatchCollection(
                    boxes,
                    # a pooled cell spans several patches: filled lightly and drawn thick, so that it
                    # reads as one region over the thin patch grid
                    facecolor=to_rgba(COLOURS[role], 0.12) if cell else "none",
                    edgecolor=COLOURS[role],
                    linewidth=1.0 if dashed else 2.4 if cell else 1.6,
                    linestyle="--" if dashed else "-",
                    label=role,
                )
            )
    axes.set_xlim(0, width / factor)
    axes.set_ylim(height / factor, 0)
    axes.set_axis_off()


def _panels(columns: int, rows: int, panel: tuple[int, int], top: int, bottom: int, gap: int = 12):
    """A figure of `rows` x `columns` panels of `panel` (width, height) pixels each, shown one
    image pixel to one figure pixel, with `top` and `bottom` pixels for titles, answers and the
    legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = columns * panel[0] + (columns + 1) * gap
    height = rows * panel[1] + (rows - 1) * gap + top + bottom
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = [
        [
            figure.add_axes(
                (
                    (gap + c * (panel[0] + gap)) / width,
                    (bottom + (rows - 1 - r) * (panel[1] + gap)) / height,
                    panel[0] / width,
                    panel[1] / height,
                )
            )
            for c in range(columns)
        ]
        for r in range(rows)
    ]
    return figure, axes


def _legend(figure, entries: list[tuple[str, str, int | None]], columns: int) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(
            facecolor=COLOURS[DROPPED] if role == DROPPED else "none",
            edgecolor=COLOURS[role] if role != KEPT else "#999999",
            linestyle="--" if role == ABSORBED else "-",
            linewidth=1.6,
            label=label if count is None else f"{label}: {count}",
        )
        for role, label, count in entries
    ]
    figure.legend(handles=handles, loc="lower center", ncol=columns, frameon=False, fontsize=9)


def _literal_text(draw):
    """A figure's text as written: prompts, answers and file names may hold "$", which matplotlib
    would otherwise read as mathtext (and fail on, or typeset)."""
    import functools

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


@_literal_text
def draw_kept(image: Image.Image, view: KeptView) -> Figure:
    """The kept-tokens figure: one panel per grid (LLaVA-NeXT: the base image and the tiles)."""
    pixels, factor = _upscaled(image)
    panel = _panel_size(pixels, MAX_LONG_SIDE)
    named = len(view.grids) > 1
    width = len(view.grids) * (panel[0] + 12)
    title = textwrap.wrap(view.title, width // 8) + ([view.note] if view.note else [])  # ~7 px a character
    top = 22 + 16 * len(title) + 16 * named
    figure, axes = _panels(len(view.grids), 1, panel, top=top, bottom=20 + 19 * len(view.legend))
    for ax, grid in zip(axes[0], view.grids, strict=True):
        _draw_grid(ax, pixels, factor, grid)
        if named:
            ax.set_title(grid.name, fontsize=9)
    figure.suptitle("\n".join(title), fontsize=10)
    _legend(figure, view.legend, columns=1)
    return figure


@dataclass(frozen=True)
class ComparedPanel:
    """One column of the side-by-side figure: what a method kept, what it answered."""

    heading: str
    view: KeptView
    answer: str


@_literal_text
def draw_comparison(image: Image.Image, columns: list[ComparedPanel], title: str) -> Figure:
    """The paper's Fig. 2 layout: the original first, then one column per method, each with its
    answer under it; LLaVA-NeXT's base image and tiles as two rows."""
    pixels, factor = _upscaled(image)
    panel = _panel_size(pixels, 400, short=300)  # panels side by side: a little smaller than alone
    rows = max(len(column.view.grids) for column in columns)
    legend = _merged_legend([column.view for column in columns])
    wrap = max(16, panel[0] // 7)
    answer_lines = max(len(textwrap.wrap(f"“{c.answer}”", wrap)[:3]) for c in columns)
    bottom = 24 + 14 * answer_lines + 18 * math.ceil(len(legend) / 3) + 10
    figure, axes = _panels(len(columns), rows, panel, top=64, bottom=bottom)
    for c, column in enumerate(columns):
        for r, grid in enumerate(column.view.grids):
            _draw_grid(axes[r][c], pixels, factor, grid)
        for r in range(len(column.view.grids), rows):
            axes[r][c].set_axis_off()
        axes[0][c].set_title("\n".join(textwrap.wrap(column.heading, wrap)[:2]), fontsize=9)
        answer = "\n".join(textwrap.wrap(f"“{column.answer}”", wrap)[:3])
        axes[-1][c].text(0.5, -0.04, answer, transform=axes[-1][c].transAxes, ha="center", va="top", fontsize=9)
    figure.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=10)
    _legend(figure, legend, columns=3)
    return figure


def _merged_legend(views: list[KeptView]) -> list[tuple[str, str, int | None]]:
    """One legend for several panels: each role once (one swatch per colour), in the words of the
    method that gives it, or in its general words where several methods name it differently
    ("selected by score" for fastv's and random's); without counts (each heading has them)."""
    labels: dict[str, set[str]] = {}
    for view in views:
        for role, label, _ in view.legend:
            if role != KEPT:
                labels.setdefault(role, set()).add(label)
    return [
        (role, next(iter(names)) if len(names) == 1 else role_label(role, ""), None) for role, names in labels.items()
    ]


# ---- accuracy against FLOPs ---------------------------------------------------------------


@dataclass(frozen=True)
class AccuracyPoint:
    """One method at one budget: FLOPs ratio (Eq. 8) and average accuracy with its 95% interval, in %."""

    method: str
    k: int | None  # None: vanilla
    flops: float
    accuracy: float
    low: float
    high: float


def accuracy_points(rows) -> list[AccuracyPoint]:
    """The points of the plot from eval's rows (records.EvalRow), in percent."""
    return [
        AccuracyPoint(row.method, row.k, 100 * row.flops_ratio, 100 * row.average, *(100 * v for v in row.average_ci95))
        for row in rows
        if not math.isnan(row.average)
    ]


def _label_budgets(axes, points: list[AccuracyPoint]) -> int:
    """One label per FLOPs ratio where points stand side by side (one per point collided into
    "k=64k=64"), above the highest error bar there, points within half a percent counted as one
    (methods compared at one --flops share stand there with budgets of their own). Budgets of
    one k share "k=64"; of one method, "k=64,128" (a method that cannot go below its first
    stage's cost); methods each at its own k get a line each: "fastv k=88". Returns the most
    lines a label has."""
    groups: list[tuple[float, list[AccuracyPoint]]] = []
    for p in sorted((p for p in points if _prunes(p.method)), key=lambda p: p.flops):
        if groups and p.flops - groups[-1][0] <= 0.5:
            groups[-1][1].append(p)
        else:
            groups.append((p.flops, [p]))
    lines = 1
    for _, group in groups:
        budgets, methods = sorted({p.k for p in group}), list(dict.fromkeys(p.method for p in group))
        if len(budgets) == 1 or len(methods) == 1:
            label = "k=" + ",".join(map(str, budgets))
        else:
            label = "\n".join(dict.fromkeys(f"{p.method} k={p.k}" for p in group))
        lines = max(lines, label.count("\n") + 1)
        where = (sum(p.flops for p in group) / len(group), max(p.high for p in group))
        axes.annotate(label, where, xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                      color="#333333")  # fmt: skip
    return lines


def _prunes(method: str) -> bool:
    return METHODS[method].prunes


DODGE = 0.012  # of the FLOPs range: how far apart the methods' points at one budget are drawn


@_literal_text
def draw_accuracy(points: list[AccuracyPoint], title: str) -> Figure:
    """Accuracy against the FLOPs ratio: a line per method, each point labelled with its k and
    its 95% interval as an error bar (the methods at one budget a little apart); vanilla as a
    horizontal reference line with its interval shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.ticker import MaxNLocator

    figure = MplFigure(figsize=(6.4, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for point in points:
        if not _prunes(point.method):  # the reference: a line across, not a point
            axes.axhspan(point.low, point.high, color="#888888", alpha=0.15, linewidth=0)
            axes.axhline(point.accuracy, color="#444444", linestyle="--", linewidth=1.2,
                         label=f"{point.method}: {point.accuracy:.1f}%")  # fmt: skip
    methods = list(dict.fromkeys(p.method for p in points if _prunes(p.method)))
    flops = [p.flops for p in points if _prunes(p.method)] or [0.0]
    # Every method has the same FLOPs at one k: each is moved sideways a little, so that its
    # error bar does not hide behind another's.
    step = DODGE * ((max(flops) - min(flops)) or 1.0)
    for number, method in enumerate(methods):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.flops)
        colour = METHODS[method].colour if method in METHODS else "#000000"  # the same in every figure
        shift = (number - (len(methods) - 1) / 2) * step
        axes.errorbar(
            [p.flops + shift for p in mine],
            [p.accuracy for p in mine],
            yerr=[[p.accuracy - p.low for p in mine], [p.high - p.accuracy for p in mine]],
            marker="o", markersize=5, capsize=3, linewidth=1.5, color=colour, label=method,
        )  # fmt: skip
    lines = _label_budgets(axes, points)
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))  # round numbers
    axes.margins(x=0.1, y=0.04 + 0.04 * lines)  # room for the labels above the highest bars, line by line
    axes.set_xlabel("FLOPs, % of vanilla (paper Eq. 8, visual tokens)")
    axes.set_ylabel("accuracy, % (error bars: 95% interval)")
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    axes.legend(fontsize=8, loc="best")  # where it covers the fewest points
    return figure


# ---- the attention shift ---------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionView:
    """The attention figure: the mean attention of the scoring queries per patch of the image
    grid under each mask, their difference (SG-BiMask - causal), and each row's sum."""

    title: str
    causal: list[list[float]]
    sg_bimask: list[list[float]]

    @property
    def difference(self) -> list[list[float]]:
        return [[b - a for a, b in zip(ra, rb)] for ra, rb in zip(self.causal, self.sg_bimask)]

    @property
    def rows(self) -> tuple[list[float], list[float]]:
        return [sum(row) for row in self.causal], [sum(row) for row in self.sg_bimask]


QUERIES = {"last": "the last prompt token", "text": "the text after the image", "all": "every token from the image on"}


def attention_title(model: str, layer: int, queries: str, n: int) -> str:
    """Names the layer as the user gave it: --layer L scores at layer L-1 and prunes before L."""
    return (
        f"{model}: attention of {QUERIES.get(queries, queries)} to the image, mean of {n} images; "
        f"scored at layer {layer - 1}, pruned before layer {layer} (--layer {layer})"
    )


@_literal_text
def draw_attention(view: AttentionView) -> Figure:
    """Heatmaps over the patch grid, causal and SG-BiMask on one colour scale and their difference
    on a scale centred on 0; then the per-row profile of both and, on its own scale, the per-row
    difference (on the demo model the two profiles nearly coincide: the shift shows there)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(15, 3.9), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 5, width_ratios=[1, 1, 1, 0.7, 0.6])
    high = max(max(max(row) for row in view.causal), max(max(row) for row in view.sg_bimask))
    for ax, values, name in ((axes[0], view.causal, "causal (FastV)"), (axes[1], view.sg_bimask, "SG-BiMask (ASAP)")):
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=high, interpolation="nearest")
        ax.set_title(name, fontsize=10)
    figure.colorbar(image, ax=axes[:2], shrink=0.85).ax.set_title("attention", fontsize=8)
    spread = max(abs(v) for row in view.difference for v in row) or 1e-12
    image = axes[2].imshow(view.difference, cmap="RdBu_r", vmin=-spread, vmax=spread, interpolation="nearest")
    axes[2].set_title("SG-BiMask - causal", fontsize=10)
    if spread < 1e-9:  # an empty panel would look like a failure: say why it is empty
        axes[2].text(0.5, 0.5, "no difference: the scoring queries\nattend alike under both masks here",
                     transform=axes[2].transAxes, ha="center", va="center", fontsize=8)  # fmt: skip
    figure.colorbar(image, ax=axes[2], shrink=0.85).ax.set_title("difference", fontsize=8)
    for ax in axes[:3]:
        ax.set_xlabel("patch column")
        ax.set_ylabel("patch row (0 = top)")
    causal, sg_bimask = view.rows
    rows = list(range(len(causal)))
    profile, shift = axes[3], axes[4]
    profile.plot(causal, rows, color=SERIES[0], linewidth=1.5, label="causal")
    profile.plot(sg_bimask, rows, color=SERIES[1], linewidth=1.5, label="SG-BiMask")
    profile.set_xlabel("attention per row")
    profile.set_ylabel("patch row (0 = top)")
    profile.set_title("per row", fontsize=10)
    profile.legend(fontsize=8)
    difference = [b - a for a, b in zip(causal, sg_bimask)]
    shift.barh(rows, difference, color=[SERIES[1] if d >= 0 else SERIES[0] for d in difference], height=0.8)
    shift.axvline(0, color="#444444", linewidth=0.8)
    shift.set_xlabel("SG-BiMask - causal")
    shift.set_title("the shift per row", fontsize=10)
    for ax in (profile, shift):
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(True, axis="x", color="#dddddd", linewidth=0.6)
    figure.suptitle("\n".join(textwrap.wrap(view.title, 170)), fontsize=10)
    return figure


# ---- files ---------------------------------------------------------------------------------


def figure_format(path: Path) -> str:
    """The file format a figure's suffix names (never PNG bytes in a .pdf)."""
    format_ = FORMATS.get(Path(path).suffix.lower())
    if format_ is None and Path(path).name.lower() in FORMATS:  # ".png": a hidden file with no suffix
        raise UsageError(f"{path} names a format but no file: give it a name, e.g. kept{Path(path).name}")
    if format_ is None:
        raise UsageError(f"cannot tell which format {path} should be: name it .png, .svg, .pdf, .jpg or .webp")
    return format_


def check_figure_writable(path: Path, inputs: Sequence[Path] = ()) -> Path:
    path = check_writable(path, inputs)
    figure_format(path)
    return path


def _is_stdout(path: Path) -> bool:
    try:
        given, stdout = path.stat(), os.fstat(1)
    except OSError:
        return False
    return (given.st_dev, given.st_ino) == (stdout.st_dev, stdout.st_ino)


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
    if path.exists() and _is_stdout(path):  # `--log /dev/stdout > out.txt`: the table would write over it
        raise UsageError(f"refusing to write {path}: it is standard output, where the results go; give it a file")
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


def save_figure(figure: Figure, path: Path, inputs: Sequence[Path] = ()) -> Path:
    """Write `figure` in the format its suffix names. Written whole to a temporary file first, so
    that a failed write (a full disk) never leaves half a file, nor spoils the one it replaces."""
    path = check_figure_writable(path, inputs)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # Files that say nothing of when they were made: the same run writes the same bytes.
    metadata = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}
    try:
        with os.fdopen(handle, "wb") as file:
            format_ = figure_format(path)
            figure.savefig(file, format=format_, dpi=DPI, metadata=metadata.get(format_))
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise AsapError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
