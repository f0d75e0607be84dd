"""VisPruner, VisionZip and PruMerge+ on LLaVA-NeXT (tiled images) against an independent reference
of the authors' own LLaVA-NeXT code (tests/reference_next.py), on the tiny LLaVA-NeXT and both
fixture images (2 x 2 tiles with rows cut by unpadding; 2 x 1 tiles with nothing cut).

Each item (base image, then the tiles) gets T = k // most_items (most_items = 5 here: 1 + the
2 x 2 grid); k = 5, 10, 15, 25, 45 give T = 1, 2, 3, 5, 9. For each method, image, k and position mode:
asap's kept slots (the report's `kept`, less the span start) and their roles are the
reference's, its first-token logits are the reference pipeline's to 1e-5 and its 5 greedy
tokens are the reference's. A k at least the span keeps the image whole (vanilla). The
reference itself is checked where it does not depend on asap's tiled support: unpruned, it lays
the span out exactly as transformers' own LLaVA-NeXT forward; on the tiny LLaVA-1.5 (one grid,
no tiles) it answers as asap's LLaVA-1.5 support, which tests/test_vispruner.py,
test_visionzip.py and test_prumerge_plus.py prove equal to the authors' 1.5 pipelines.
"""

import pytest
import reference_next
import torch
from reference_next import METHODS, layout, most_items, per_item_budget, vispruner_next
from transformers import AutoModelForImageTextToText

import asapcli
from asapcli.runtime.inputs import build_inputs, user_message
from asapcli.runtime.loading import load

PROMPT = "what is it?"


@pytest.fixture(scope="module")
def next_models(llava_next_path):
    """asap's model (loaded as the CLI loads it) and a fresh, untouched copy for the reference."""
    lvlm = load(str(llava_next_path), device="cpu")
    return lvlm, AutoModelForImageTextToText.from_pretrained(llava_next_path).eval()


@pytest.fixture(scope="module")
def next_prompts(next_models, images):
    lvlm, _ = next_models
    return [build_inputs(lvlm.processor, [user_message(PROMPT, 1)], [image]) for image in images]


@pytest.fixture(scope="module")
def llava_models(llava_path, images):
    lvlm = load(str(llava_path), device="cpu")
    reference = AutoModelForImageTextToText.from_pretrained(llava_path).eval()
    return lvlm, reference, [build_inputs(lvlm.processor, [user_message(PROMPT, 1)], [image]) for image in images]


def asap_run(model, inputs, method: str, k: int, positions: str, **options):
    """asap's report of the prefill's image, first-token logits, and 5 greedy tokens."""
    length = inputs["input_ids"].shape[1]
    with torch.inference_mode(), asapcli.pruned(model, method=method, k=k, positions=positions, **options) as pruning:
        logits = model(**inputs).logits[0, -1]
        report = pruning.report()
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    (image,) = report.images
    return image, logits, generated[0, length:].tolist()


# k per method: vispruner at T = 1, 2, 5 (and one other ratio); visionzip at T = 2, 5, 9 (9: tiles'
# dominant patches fall in the rows unpadding cuts) and a given contextual count; prumerge-plus
# where the authors' fixed path runs (T = 3, 5, 9: T - 1 = 2 N / m, m dividing N = 16) and adaptive.
CASES = [
    ("vispruner", 5, {}),
    ("vispruner", 10, {}),
    ("vispruner", 25, {}),
    ("vispruner", 25, {"important_ratio": 0.25}),
    ("visionzip", 10, {}),
    ("visionzip", 25, {}),
    ("visionzip", 25, {"contextual": 2}),
    ("visionzip", 45, {}),
    ("prumerge-plus", 15, {}),
    ("prumerge-plus", 25, {}),
    ("prumerge-plus", 25, {"adaptive": True}),
    ("prumerge-plus", 45, {}),
]


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("image", [0, 1])
@pytest.mark.parametrize("method, k, options", CASES, ids=[f"{m}-{k}-{'-'.join(o) or 'default'}" for m, k, o in CASES])
def test_kept_slots_and_answers_are_the_authors_next_pipeline(
    method, k, options, image, positions, next_models, next_prompts
):
    lvlm, reference = next_models
    inputs = next_prompts[image]
    expected = METHODS[method](reference, inputs, k, renumber=positions == "renumber", **options)
    report, logits, tokens = asap_run(lvlm.model, inputs, method, k, positions, **options)
    assert report.kept is not None, "nothing pruned"
    assert [position - report.start for position in report.kept] == expected.kept
    assert report.roles == expected.roles
    assert torch.allclose(logits, expected.logits, atol=1e-5, rtol=1e-5), float((logits - expected.logits).abs().max())
    assert tokens == expected.greedy


@pytest.mark.parametrize("image", [0, 1])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_k_covering_the_span_keeps_the_image_whole(method, image, next_models, next_prompts):
    lvlm, reference = next_models
    inputs = next_prompts[image]
    span = layout(reference, inputs).length
    expected = METHODS[method](reference, inputs, span, renumber=False)
    assert expected.kept == list(range(span)) and expected.embeds is None  # the reference ran the plain model
    report, logits, tokens = asap_run(lvlm.model, inputs, method, span, "original")
    assert report.kept in (None, list(range(report.start, report.end)))
    assert report.end - report.start == span
    assert torch.allclose(logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert tokens == expected.greedy


# ----------------------------------------------------------------------------- the reference's own checks


def test_the_budget_counts_the_largest_grid_plus_the_base(next_models, llava_models):
    _, reference = next_models
    assert most_items(reference.config) == 5  # pinpoints up to 32 x 32 px of 16 px tiles: 4 tiles
    assert [per_item_budget(reference.config, k) for k in (5, 9, 10, 25, 69)] == [1, 1, 2, 5, 13]
    assert most_items(llava_models[1].config) == 1


def test_the_reference_layout_unpruned_is_transformers_own_span(next_models, next_prompts):
    """VisPruner's mask canvas with every patch kept (T = N per item) rebuilds the span exactly as
    transformers packs it (base, unpadded tiles, newline column) and answers as the plain model."""
    _, reference = next_models
    spans = []
    for inputs in next_prompts:
        expected = vispruner_next(reference, inputs, 0, renumber=False, per_item=16)
        with torch.inference_mode():
            own = reference.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
            assert torch.equal(expected.tokens, torch.cat(own))
            assert torch.equal(expected.logits, reference(**inputs).logits[0, -1])
        lay = layout(reference, inputs)
        spans.append((lay.grid, lay.length, int((lay.span_ids == reference_next.NEWLINE).sum())))
        assert expected.kept == list(range(lay.length))
        assert expected.roles.count("kept") == spans[-1][2]  # every newline slot kept, as "kept"
    # the fixture images: 2 x 2 tiles, unpadding cuts the canvas's top and bottom patch rows
    # (6 rows of 8 + newline); 2 x 1 tiles, nothing cut (8 rows of 4 + newline)
    assert spans == [((2, 2), 16 + 6 * 9, 6), ((2, 1), 16 + 8 * 5, 8)]


def test_the_slots_walk_claims_first_then_the_lowest_free_ones():
    assert reference_next.assign_slots([5, 2, 4, 2, 6, 5, None], 8) == [5, 2, 4, 0, 6, 1, 3]
    assert reference_next.assign_slots([None, 3, None, 0], 5) == [1, 3, 2, 0]


def test_visionzip_reads_the_full_canvas_in_raster_order_then_cls_then_contextual(next_models, next_prompts):
    """On the 2 x 2 image, the tiles' dominant patches reach the prompt in raster order of the
    full 8 x 8 canvas (tile rows interleaved), before every tile's [CLS] and contextual tokens."""
    _, reference = next_models
    inputs = next_prompts[0]
    expected = METHODS["visionzip"](reference, inputs, 25, renumber=True, steps=-1)
    lay = layout(reference, inputs)
    t = per_item_budget(reference.config, 25)
    dominant, contextual = reference_next.visionzip_split(t)
    tiles = 4
    tile_part = expected.claims[t : t + tiles * (dominant - 1)]
    canvas = {int(item_id): index for index, item_id in enumerate(lay.canvas_ids.flatten().tolist())}
    raster = [canvas[int(lay.span_ids[claim])] for claim in tile_part if claim is not None]
    assert raster == sorted(raster) and len(raster) >= 2
    assert expected.tokens.shape[0] == 5 * t
    roles_in_order = [expected.roles[expected.kept.index(slot)] for slot in expected.slots]
    assert roles_in_order[t + tiles * (dominant - 1) :] == ["global"] * tiles + ["contextual"] * tiles * contextual


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize(
    "method, k, options",
    [("vispruner", 13, {}), ("visionzip", 13, {}), ("prumerge-plus", 17, {}), ("prumerge-plus", 9, {"adaptive": True})],
)
def test_on_one_grid_the_reference_answers_as_the_validated_llava_1_5_support(
    method, k, options, positions, llava_models
):
    """The same reference functions on the tiny LLaVA-1.5 (one item, no tiles): asap's LLaVA-1.5
    support, proven equal to the authors' 1.5 pipelines by the 1.5 tests, gives the same kept
    slots, roles, logits and tokens, for both fixture images."""
    lvlm, reference, prompts = llava_models
    for inputs in prompts:
        expected = METHODS[method](reference, inputs, k, renumber=positions == "renumber", **options)
        report, logits, tokens = asap_run(lvlm.model, inputs, method, k, positions, **options)
        assert [position - report.start for position in report.kept] == expected.kept
        assert report.roles == expected.roles
        assert torch.allclose(logits, expected.logits, atol=1e-5, rtol=1e-5)
        assert tokens == expected.greedy
