"""The figures and the data behind them: why the engine kept each token (roles, checked against the
independent reference), where each token sits on the image (LLaVA-1.5 and LLaVA-NeXT, through
the processor), which patch each figure draws in which role, the legend's counts, the points and
heatmaps of eval's plots, and the files: the format their name says, the size they promise."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_asap import ReferenceLM
from tiny_models import pruned_by
from transformers import AutoModelForImageTextToText, AutoProcessor

import asapcli
from asapcli.commands import answering
from asapcli.engine import image_spans
from asapcli.engine.methods import ANCHOR, DIVERSE, KEPT, METHODS, POOLED, REFILLED, ROLES, SELECTED, SpanView
from asapcli.engine.methods.pool import Pool
from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.errors import UsageError
from asapcli.records import EvalRow
from asapcli.report import figures
from asapcli.runtime import patch_layout
from asapcli.runtime.inputs import Samples, build_inputs, load_image, user_message
from asapcli.runtime.loading import load
from asapcli.runtime.presets import find_preset

CAR = Path(__file__).resolve().parent.parent / "examples" / "car.png"
QUESTION = "what colour is the car?"


@pytest.fixture(scope="module")
def demo():
    return load("demo", device="cpu")


def demo_plan(demo, method: str, k: int = 128, **options):
    inputs = build_inputs(demo.processor, [user_message(QUESTION, 1)], [load_image(CAR)])
    plan = plan_for(demo, inputs["input_ids"][0], PruneSettings(method, k=k, layer=2, **options))
    with torch.inference_mode(), pruned_by(demo.model, plan) as session:
        demo.model(**inputs)
    return inputs, session.prefills[0]


# ---- roles, from the engine ------------------------------------------------------------------


def test_asaps_roles_are_the_references_anchors_sources_and_refills(demo):
    """The reference (written from the paper alone) records which selected token absorbed which
    and what the pool refilled; the engine's roles must say the same, token by token."""
    torch.set_num_threads(1)
    inputs, done = demo_plan(demo, "asap")
    model = AutoModelForImageTextToText.from_pretrained(find_preset("demo").bundled_path()).eval()
    expected = ReferenceLM(model).pruned(inputs, "asap", 128, 2)
    ((start, _),) = done.plans[0].spans
    debug = expected.debug[start]
    (record,) = done.pruned()
    kept = (record.kept - start).tolist()
    roles = dict(zip(kept, record.roles, strict=True))
    absorbed = dict(zip(kept, record.absorbed, strict=True))
    anchors = {anchor for anchor, members in debug["sources"].items() if members}
    assert {i for i, role in roles.items() if role == ANCHOR} == anchors
    assert {i for i, role in roles.items() if role == REFILLED} == set(debug["refill"])
    assert {i for i, role in roles.items() if role == SELECTED} == set(debug["top"]) - anchors - {
        member for members in debug["sources"].values() for member in members
    }
    for anchor in anchors:
        assert sorted(absorbed[anchor]) == sorted(debug["sources"][anchor])
    assert (
        sum(map(len, absorbed.values())) == done.prompt().merged_tokens == len(debug["refill"]) == 111
    )  # the README's demo
    assert all(absorbed[i] == [] for i, role in roles.items() if role != ANCHOR)


def test_fastv_divprune_and_random_keep_by_selection_only(demo):
    for method, role in (("fastv", SELECTED), ("divprune", DIVERSE), ("random", SELECTED)):
        _, done = demo_plan(demo, method)
        assert done.pruned()[0].roles == [role] * 128 and done.pruned()[0].absorbed == [[]] * 128


def test_a_method_has_one_colour_in_every_figure():
    """asap was green in one plot and orange in another: the colour went by the order drawn."""
    from matplotlib.colors import to_hex

    colours = {name: to_hex(method.colour) for name, method in METHODS.items()}
    assert len(set(colours.values())) == len(colours)
    roles = [role.colour for role in ROLES.values()]
    assert len(set(roles)) == len(roles)  # and one colour per role in the kept-token figures
    for names in (["fastv", "asap"], ["vispruner", "divprune", "asap", "random"]):
        rows = [row("vanilla", None, 1.0, 0.98, 0.95, 1.0)] + [row(n, 64, 0.5, 0.9, 0.85, 0.95) for n in names]
        axes = figures.draw_accuracy(figures.accuracy_points(rows), "demo").axes[0]
        drawn = {container.get_label(): to_hex(container.lines[0].get_color()) for container in axes.containers}
        assert drawn == {name: colours[name] for name in names}


def test_one_swatch_per_colour_in_a_merged_legend():
    """fastv's "selected by score" and divprune's "selected for diversity" were two blue swatches;
    random's "chosen at random" shares fastv's role, so it shares its swatch, in the general words."""
    views = [
        figures.KeptView("", method, [], [(role, figures.role_label(role, method), 1)])
        for method, role in (("fastv", SELECTED), ("divprune", DIVERSE), ("random", SELECTED))
    ]
    legend = figures._merged_legend(views)
    assert [(role, label) for role, label, _ in legend] == [
        (SELECTED, "selected by score"),
        (DIVERSE, "selected for diversity"),
    ]
    assert len({figures.COLOURS[role] for role, _, _ in legend}) == len(legend)


def test_pools_cells_are_the_patches_adaptive_pooling_averages():
    side, cells = 24, 11  # 24 is no multiple of 11: neighbouring cells share a row or a column
    hidden = torch.randn(side * side, 6)
    selection = Pool().select(SpanView(start=0, hidden=hidden), cells * cells)
    assert selection.roles == [POOLED] * cells * cells
    covered = set()
    for corner, others, state in zip(selection.kept.tolist(), selection.absorbed, selection.hidden, strict=True):
        members = [corner, *others]
        covered.update(members)
        torch.testing.assert_close(state, hidden[members].mean(dim=0))
    assert covered == set(range(side * side))  # the cells cover the whole image


def test_the_python_api_reports_each_kept_tokens_role(llava_path, images):
    model = AutoModelForImageTextToText.from_pretrained(llava_path).eval()
    processor = AutoProcessor.from_pretrained(llava_path)
    inputs = build_inputs(processor, [user_message("what is it?", 1)], images[:1])
    with torch.inference_mode(), asapcli.pruned(model, method="asap", k=8, layer=2, merge_threshold=0.3) as pruning:
        model(**inputs)
    report = pruning.report()
    (image,) = report.images
    assert len(image.roles) == len(image.kept) == 8 and report.merged_tokens > 0
    assert image.roles.count(REFILLED) == report.merged_tokens
    absorbed = [position for sources in image.absorbed for position in sources]
    assert len(absorbed) == report.merged_tokens
    assert all(image.start <= p < image.end and p not in image.kept for p in absorbed)  # positions, dropped


# ---- where tokens sit ------------------------------------------------------------------------


def test_a_fixed_grid_lies_over_what_the_centre_crop_keeps(demo):
    layout = patch_layout.span_layout(demo.processor, (120, 96), 576)  # CLIP keeps the middle 96 x 96
    (grid,) = layout.grids
    assert (grid.rows, grid.cols, grid.box) == (24, 24, (12.0, 0.0, 108.0, 96.0))
    assert grid.patch_box(0, 0) == (12.0, 0.0, 16.0, 4.0) and layout.locate(25) == (0, 1, 1)


@pytest.mark.parametrize("size", [(40, 30), (20, 50), (32, 32), (100, 20)])
def test_llava_next_base_image_and_tiles_count_as_the_processor_does(llava_next_path, size):
    processor = AutoProcessor.from_pretrained(llava_next_path)
    inputs = processor(images=[Image.new("RGB", size)], text="<image> hi", return_tensors="pt")
    ((start, end),) = image_spans(inputs["input_ids"][0], processor.image_token_id)
    layout = patch_layout.span_layout(processor, size, end - start)  # refuses a count it does not reach
    base, tiles = layout.grids
    assert (base.first, base.rows * base.cols, base.box) == (0, 16, (0, 0, *size))
    assert tiles.first == 16 and tiles.stride == tiles.cols + 1  # a newline slot ends each row
    assert layout.extra == [16 + r * tiles.stride + tiles.cols for r in range(tiles.rows)]
    width, height = size
    left, top, right, bottom = tiles.box  # the tiles cover the image, to half a patch of padding
    assert abs(left) < 3 and abs(top) < 3 and abs(right - width) < 3 and abs(bottom - height) < 3


def test_what_the_tower_never_sees_is_dimmed_what_it_kept_is_not():
    grid = figures.GridView("image", (12.0, 0.0, 108.0, 96.0), [[KEPT] * 24 for _ in range(24)])
    pixels = np.full((96, 120, 3), 200, dtype=np.uint8)
    drawn = figures._composite(pixels, 1, grid)
    assert tuple(drawn[50, 5]) < (100, 100, 100) and tuple(drawn[50, 60]) == (200, 200, 200)


def test_tokens_laid_out_otherwise_are_refused(demo):
    with pytest.raises(UsageError, match="cannot tell where the image's 70 tokens sit"):
        patch_layout.span_layout(demo.processor, (96, 96), 70)


# ---- the kept-tokens figure ----------------------------------------------------------------


def small_layout() -> patch_layout.SpanLayout:
    return patch_layout.SpanLayout(16, [patch_layout.PatchGrid("image", 0, 4, 4, 4, (0.0, 0.0, 8.0, 8.0))])


def test_each_patch_is_drawn_in_its_tokens_role_and_the_legend_counts_them():
    kept, roles, absorbed = [0, 5, 10, 15], [SELECTED, ANCHOR, REFILLED, ANCHOR], [[], [6, 9], [], [14]]
    view = figures.kept_view(small_layout(), kept, roles, absorbed, "t", "asap")
    (grid,) = view.grids
    assert grid.cells_in(SELECTED) == [(0, 0)] and grid.cells_in(ANCHOR) == [(1, 1), (3, 3)]
    assert grid.cells_in(REFILLED) == [(2, 2)]
    assert grid.cells_in(figures.ABSORBED) == [(1, 2), (2, 1), (3, 2)]
    assert len(grid.cells_in(figures.DROPPED)) == 16 - 4 - 3
    assert [(role, count) for role, _, count in view.legend] == [
        (SELECTED, 1), (ANCHOR, 2), (figures.ABSORBED, 3), (REFILLED, 1), (figures.DROPPED, 9)
    ]  # fmt: skip
    outlined = {(role, box) for role, box in grid.outlines}
    assert (figures.ABSORBED, (4.0, 2.0, 6.0, 4.0)) in outlined  # patch 6 (row 1, col 2), the anchor's colour
    assert (ANCHOR, (2.0, 2.0, 4.0, 4.0)) in outlined

    figure = figures.draw_kept(Image.new("RGB", (8, 8), "white"), view)
    drawn = {c.get_label(): len(c.get_paths()) for c in figure.axes[0].collections if c.get_label() in figures.COLOURS}
    assert drawn == {figures.ABSORBED: 3, SELECTED: 1, ANCHOR: 2, REFILLED: 1}
    assert figure.legends[0].get_texts()[0].get_text() == "selected by score: 1"


def test_pools_cells_are_drawn_as_cells():
    cells = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    view = figures.kept_view(small_layout(), [c[0] for c in cells], [POOLED] * 4, [c[1:] for c in cells], "t", "pool")
    (grid,) = view.grids
    assert len(grid.cells_in(POOLED)) == 16  # every patch is in a cell: none dimmed
    assert sorted(box for _, box in grid.outlines) == [(0, 0, 4, 4), (0, 4, 4, 8), (4, 0, 8, 4), (4, 4, 8, 8)]
    assert view.legend == [(POOLED, "pooled cell", 4)]


def test_an_unpruned_image_is_drawn_whole():
    view = figures.kept_view(small_layout(), None, None, None, "t", "vanilla")
    assert len(view.grids[0].cells_in(KEPT)) == 16 and view.grids[0].outlines == []


def test_save_kept_draws_the_engines_roles_large_enough_to_read(tmp_path, monkeypatch, asap):
    drawn = []
    draw = figures.draw_kept
    monkeypatch.setattr(figures, "draw_kept", lambda image, view: drawn.append(view) or draw(image, view))
    out = tmp_path / "kept.png"
    result = asap("run", CAR, QUESTION, "--save-kept", out, "--max-tokens", 1, "--json")
    assert result.exit_code == 0, result.output
    merged = json.loads(result.stdout)["merged_tokens"]
    (view,) = drawn
    legend = {role: count for role, _, count in view.legend}
    assert legend[REFILLED] == legend[figures.ABSORBED] == merged
    assert legend[SELECTED] + legend[ANCHOR] + legend[REFILLED] == 128
    assert legend[figures.DROPPED] == 576 - 128 - merged
    assert view.title == "demo: asap, k=128, L=2: kept 128 of 576 visual tokens"
    picture = Image.open(out)
    assert picture.format == "PNG" and min(picture.size) >= figures.MIN_SHORT_SIDE


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_a_figure_is_written_in_the_format_its_name_says(tmp_path, suffix, magic):
    view = figures.kept_view(small_layout(), [0], [SELECTED], [[]], "t", "fastv")
    out = figures.save_figure(figures.draw_kept(Image.new("RGB", (8, 8)), view), tmp_path / f"kept{suffix}")
    assert out.read_bytes().startswith(magic)


def test_llava_next_kept_figure_has_the_base_image_and_the_tiles(llava_next_path, tmp_path, monkeypatch, asap):
    drawn = []
    draw = figures.draw_kept
    monkeypatch.setattr(figures, "draw_kept", lambda image, view: drawn.append(view) or draw(image, view))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "wide.png")
    args = ["-m", llava_next_path, "-k", 20, "--layer", 1, "--max-tokens", 1]
    result = asap("run", tmp_path / "wide.png", "hi", "--method", "fastv", *args, "--save-kept", tmp_path / "k.png")
    assert result.exit_code == 0, result.output
    (view,) = drawn
    assert [grid.name for grid in view.grids] == ["base image", "tiles"]
    on_grid = sum(len(grid.cells_in(SELECTED)) for grid in view.grids)
    off_grid = re.match(r"also kept: (\d+) of the 6 tokens on no patch \(row ends\)$", view.note) if view.note else None
    assert on_grid + (int(off_grid.group(1)) if off_grid else 0) == 20  # the rest are newline slots
    assert len(Image.open(tmp_path / "k.png").getbbox()) == 4


# ---- compare ---------------------------------------------------------------------------------


def test_compare_prints_each_answer_and_draws_a_panel_per_method(tmp_path, monkeypatch, asap):
    columns = []
    draw = figures.draw_comparison
    monkeypatch.setattr(figures, "draw_comparison", lambda image, c, title: columns.extend(c) or draw(image, c, title))
    out = tmp_path / "compare.png"
    result = asap("compare", CAR, QUESTION, "--methods", "fastv,asap", "-k", 64, "--out", out, "--max-tokens", 2)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["vanilla (kept 576/576)", "fastv k=64 (kept 64/576)",
                                                      "asap k=64 (kept 64/576)"]  # fmt: skip
    assert [c.heading for c in columns] == [
        "original (vanilla, 576 tokens)", "fastv k=64: kept 64/576", "asap k=64: kept 64/576"
    ]  # fmt: skip
    assert [c.answer for c in columns] == [line.split(": ", 1)[1] for line in lines]
    assert len(columns[0].view.grids[0].cells_in(KEPT)) == 576
    assert {role for role, *_ in columns[2].view.legend} >= {ANCHOR, REFILLED}
    assert Image.open(out).format == "PNG"

    result = asap("compare", CAR, QUESTION, "--methods", "pool", "-k", 64, "--max-tokens", 2, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["figure"] is None and [a["method"] for a in report["answers"]] == ["vanilla", "pool"]
    assert report["answers"][1]["kept_tokens"] == 64


@pytest.mark.parametrize("size, tokens", [((500, 1), 16), ((1, 500), 16 + 4)])
def test_an_image_thinner_than_a_tile_row_keeps_its_base_grid_and_newlines(llava_next_path, size, tokens):
    """Unpadding leaves such an image no tile patch (no row, or no column but the newlines)."""
    processor = AutoProcessor.from_pretrained(llava_next_path)
    inputs = processor(images=[Image.new("RGB", size)], text="<image> hi", return_tensors="pt")
    ((start, end),) = image_spans(inputs["input_ids"][0], processor.image_token_id)
    layout = patch_layout.span_layout(processor, size, end - start)
    assert end - start == layout.tokens == tokens and [grid.name for grid in layout.grids] == ["base image"]
    assert layout.extra == list(range(16, tokens))


def test_dollar_signs_in_a_prompt_or_answer_are_drawn_as_written(tmp_path, monkeypatch, asap):
    texts = []
    draw = figures.draw_comparison
    monkeypatch.setattr(figures, "draw_comparison", lambda i, c, t: texts.append(t) or draw(i, c, t))
    out = tmp_path / "compare.png"
    result = asap("compare", CAR, "is it $$?", "--methods", "fastv", "-k", 64, "--out", out, "--max-tokens", 2)
    assert result.exit_code == 0, result.output  # matplotlib would read "$$" as an empty formula and fail
    assert "is it $$?" in texts[0] and Image.open(out).format == "PNG"


def test_compare_checks_its_figure_before_the_model_loads(tmp_path, asap):
    result = asap("compare", CAR, QUESTION, "--out", tmp_path / "figure.gif")
    assert result.exit_code == 2 and "name it .png, .svg, .pdf, .jpg or .webp" in result.stderr
    result = asap("compare", CAR, QUESTION, "--out", CAR)
    assert result.exit_code == 2 and "it is an input of this run" in result.stderr


# ---- eval's plots --------------------------------------------------------------------------


def row(method, k, flops, average, low, high) -> EvalRow:
    return EvalRow(method, k, {}, flops, {}, {}, average, None, 10, {}, [low, high])


def test_the_accuracy_plot_labels_each_point_with_its_k_and_draws_vanilla_as_a_line():
    rows = [
        row("vanilla", None, 1.0, 0.98, 0.95, 1.0),
        row("fastv", 128, 0.576, 0.87, 0.84, 0.90),
        row("asap", 128, 0.576, 0.976, 0.96, 0.99),
        row("fastv", 64, 0.535, 0.84, 0.80, 0.88),
    ]
    points = figures.accuracy_points(rows)
    assert [(p.method, p.k, p.flops, p.accuracy) for p in points][1] == ("fastv", 128, pytest.approx(57.6), 87.0)
    figure = figures.draw_accuracy(points, "demo")
    axes = figure.axes[0]
    series = {container.get_label(): container.lines for container in axes.containers}
    assert list(series) == ["fastv", "asap"]
    line, _, (bars,) = series["fastv"]
    dodge = figures.DODGE * (57.6 - 53.5) / 2  # two methods: each half a step to its side
    assert list(line.get_xdata()) == pytest.approx([53.5 - dodge, 57.6 - dodge])
    assert list(line.get_ydata()) == pytest.approx([84, 87])
    bounds = [bound for (_, low), (_, high) in bars.get_segments() for bound in (low, high)]
    assert bounds == pytest.approx([80, 88, 84, 90])  # flat: pytest 9.2's approx takes no nested sequences
    vanilla = next(line for line in axes.get_lines() if line.get_label().startswith("vanilla"))
    assert list(vanilla.get_ydata()) == [98.0, 98.0]  # a horizontal line across the plot
    labels = sorted((text.get_text(), text.xy) for text in axes.texts)  # one per budget, above its highest bar
    assert labels == [("k=128", (pytest.approx(57.6), 99.0)), ("k=64", (pytest.approx(53.5), 88.0))]
    for ticks in (axes.get_xticks(), axes.get_yticks()):
        assert all(abs(t * 2 - round(t * 2)) < 1e-9 for t in ticks)  # round numbers, not 53.5 / 65.2 / 76.8


def test_the_attention_figure_names_the_layer_as_given_and_draws_the_maps():
    title = figures.attention_title("demo", 2, "last", 40)
    assert "scored at layer 1, pruned before layer 2" in title
    causal, sg = [[0.1, 0.2], [0.3, 0.4]], [[0.2, 0.2], [0.1, 0.4]]
    view = figures.AttentionView(title, causal, sg)
    np.testing.assert_allclose(view.difference, [[0.1, 0.0], [-0.2, 0.0]], atol=1e-12)
    np.testing.assert_allclose(view.rows, [[0.3, 0.7], [0.4, 0.5]])
    figure = figures.draw_attention(view)
    maps = [ax.images[0].get_array().tolist() for ax in figure.axes[:3]]
    assert maps[:2] == [causal, sg]
    np.testing.assert_allclose(maps[2], view.difference)
    shift = figure.axes[4]
    assert [bar.get_width() for bar in shift.patches] == pytest.approx([0.1, -0.2])
    assert not figure.axes[2].texts  # a difference to show: no note
    same = figures.draw_attention(figures.AttentionView(title, causal, causal))  # --layer 1 with text queries
    assert [text.get_text() for text in same.axes[2].texts] == [
        "no difference: the scoring queries\nattend alike under both masks here"
    ]


def test_a_plot_of_vanilla_alone_is_refused(asap):
    result = asap("eval", "-n", 2, "--methods", "vanilla", "--plot", "accuracy.png")
    assert result.exit_code == 2 and "name one in --methods beside vanilla" in result.stderr


def test_eval_writes_both_plots_from_its_own_numbers(tmp_path, monkeypatch, asap):
    seen = {}
    accuracy, attention = figures.draw_accuracy, figures.draw_attention
    monkeypatch.setattr(figures, "draw_accuracy", lambda p, t: seen.setdefault("points", p) and accuracy(p, t))
    monkeypatch.setattr(figures, "draw_attention", lambda v: seen.setdefault("view", v) and attention(v))
    plot, profile = tmp_path / "accuracy.svg", tmp_path / "attention.png"
    args = ["-n", 4, "--methods", "vanilla,asap", "-k", 64, "--layer", 2, "--json"]
    result = asap("eval", *args, "--plot", plot, "--attention-profile", profile)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(p.method, p.k, p.accuracy) for p in seen["points"]] == [
        (r["method"], r["k"], pytest.approx(100 * r["average"])) for r in report["results"]
    ]
    attention_profile = report["attention_profile"]
    assert seen["view"].causal == attention_profile["causal_patches"]
    assert [sum(r) for r in attention_profile["sg_bimask_patches"]] == pytest.approx(attention_profile["sg_bimask"])
    assert len(attention_profile["causal_patches"]) == 24 and len(attention_profile["causal_patches"][0]) == 24
    assert "scored at layer 1, pruned before layer 2" in seen["view"].title
    assert plot.read_bytes().startswith(b"<?xml") and Image.open(profile).format == "PNG"


def test_answering_refuses_to_draw_an_image_it_cannot_place(demo, monkeypatch):
    samples = Samples([(CAR, QUESTION)], {CAR: load_image(CAR)})
    monkeypatch.setattr(patch_layout, "_single_grid", lambda *args: None)
    with pytest.raises(UsageError, match="cannot tell where"):
        answering.answer(demo, PruneSettings("fastv", k=64), samples, max_tokens=1, draws_kept=True)


@pytest.mark.parametrize("size", [(3000, 2000), (2000, 8), (8, 2000)])
def test_a_large_or_long_image_makes_a_figure_of_a_figures_size(size, tmp_path, asap):
    """An 8000 px photo once made an 8000 px figure (6 GB to draw), a 4000 x 10 strip a
    156,000 px one: the drawn image stops at figures.MAX_LONG_SIDE."""
    source = tmp_path / "wide.png"
    Image.new("RGB", size, (200, 40, 40)).save(source)
    for command in (
        ["run", source, "what colour?", "--save-kept", tmp_path / "kept.png"],
        ["compare", source, "what colour?", "--methods", "fastv", "--out", tmp_path / "compare.png"],
    ):
        result = asap(*command)
        assert result.exit_code == 0, result.output
        with Image.open(command[-1]) as figure:
            assert max(figure.size) <= 2 * figures.MAX_LONG_SIDE, figure.size


def test_budgets_that_cost_the_same_share_one_label():
    """A multi-stage method that cannot go below its first stage's cost gives k=64 and k=128 one
    point: their labels were drawn over each other ("k=128k=64")."""
    rows = [row("vanilla", None, 1.0, 0.98, 0.95, 1.0)]
    rows += [row("pdrop", k, 0.251, 0.54, 0.51, 0.57) for k in (128, 64)] + [row("pdrop", 192, 0.306, 0.8, 0.78, 0.83)]
    axes = figures.draw_accuracy(figures.accuracy_points(rows), "demo").axes[0]
    assert sorted(text.get_text() for text in axes.texts) == ["k=192", "k=64,128"]


def test_methods_at_one_flops_share_label_each_its_own_k():
    """At one --flops share the methods stand within half a percent of each other with budgets of
    their own: their labels were drawn over each other ("k=3̶7̶0")."""
    rows = [row("vanilla", None, 1.0, 0.98, 0.95, 1.0)]
    rows += [row("fastv", 88, 0.550, 0.90, 0.85, 0.95), row("divprune", 370, 0.548, 0.92, 0.88, 0.96)]
    rows += [row("fastv", 289, 0.700, 0.95, 0.90, 0.99)]
    axes = figures.draw_accuracy(figures.accuracy_points(rows), "demo").axes[0]
    assert sorted(text.get_text() for text in axes.texts) == ["divprune k=370\nfastv k=88", "k=289"]
