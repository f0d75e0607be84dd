"""The methods that read the vision tower (vispruner, visionzip, prumerge-plus) on LLaVA-NeXT,
beyond their equality with the authors' pipelines (tests/test_next_tower_methods.py): the slot
rule, a padded batch and a prompt of two images (each span reads its own image's tiles), a
budget that prunes nothing, and the CLI."""

import json
from dataclasses import replace

import pytest
import torch

import asapcli
from asapcli.engine import UnsupportedModel
from asapcli.engine.methods import SpanView
from asapcli.engine.methods.prumerge_plus import PruMergePlus
from asapcli.engine.methods.tower import Fed, TiledCues, claim_slots
from asapcli.engine.methods.visionzip import VisionZip
from asapcli.engine.methods.vispruner import VisPruner
from asapcli.engine.vision import VisionCues
from asapcli.errors import UsageError
from asapcli.runtime.inputs import build_batch_inputs, build_inputs, user_message
from asapcli.runtime.loading import load

TOWER_METHODS = ["vispruner", "visionzip", "prumerge-plus"]


@pytest.fixture(scope="module")
def next_model(llava_next_path):
    return load(str(llava_next_path), device="cpu")


def test_a_token_takes_its_own_slot_first_come_and_the_rest_the_lowest_free_ones():
    # 5 and 2 twice: the repeats take free slots; -1 (a [CLS] or extra token, a cut patch) too
    assert claim_slots([5, 2, -1, 4, 2, 6, 5, -1], 8) == [5, 2, 0, 4, 1, 6, 3, 7]
    assert claim_slots([-1, 0, 1], 3) == [2, 0, 1]  # a later token's own slot is never given away


@pytest.mark.parametrize("method", TOWER_METHODS)
def test_a_padded_batch_answers_as_its_rows_one_by_one(method, next_model, images):
    processor, model = next_model.processor, next_model.model
    prompts = ["what is it?", "which colour is the shape on the left?"]
    batch = build_batch_inputs(processor, list(zip(prompts, images, strict=True)))
    assert batch["attention_mask"][0].sum() != batch["attention_mask"][1].sum()  # padded
    with torch.inference_mode(), asapcli.pruned(model, method=method, k=25) as pruning:
        answers = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    kept = [image.kept for image in pruning.report().images]
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        single = build_inputs(processor, [user_message(prompt, 1)], [image])
        with torch.inference_mode(), asapcli.pruned(model, method=method, k=25) as alone:
            answer = model.generate(**single, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert alone.report().images[0].kept == kept[row]
        assert answer[0, -4:].tolist() == answers[row, -4:].tolist()


@pytest.mark.parametrize("method", TOWER_METHODS)
def test_each_image_of_a_prompt_is_pruned_by_its_own_tiles(method, next_model, images):
    processor, model = next_model.processor, next_model.model
    both = build_inputs(processor, [user_message("compare them", 2)], images)
    with torch.inference_mode(), asapcli.pruned(model, method=method, k=25) as pruning:
        model(**both)
    together = [[p - image.start for p in image.kept] for image in pruning.report().images]
    for image, seen in zip(images, together):
        alone = build_inputs(processor, [user_message("compare them", 1)], [image])
        with torch.inference_mode(), asapcli.pruned(model, method=method, k=25) as pruning:
            model(**alone)
        (report,) = pruning.report().images
        assert [p - report.start for p in report.kept] == seen
    assert together[0] != together[1]


@pytest.mark.parametrize("method", TOWER_METHODS)
def test_a_budget_of_the_whole_span_is_vanilla_bit_for_bit(method, next_model, images):
    processor, model = next_model.processor, next_model.model
    inputs = build_inputs(processor, [user_message("what is it?", 1)], images[:1])
    with torch.inference_mode():
        vanilla = model(**inputs).logits
        with asapcli.pruned(model, method=method, k=10_000) as pruning:
            ours = model(**inputs).logits
    assert torch.equal(ours, vanilla)
    assert pruning.report().images[0].kept is None


@pytest.mark.parametrize("method", TOWER_METHODS)
def test_the_cli_runs_them_on_a_tiled_model(method, asap, llava_next_path, image_file):
    result = asap("run", image_file, "what is it?", "-m", llava_next_path, "--method", method, "-k", 25, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert 0 < data["kept_tokens"] < data["visual_tokens"] and data["layer"] == 0 and data["flops_ratio"] < 1


def test_evals_flops_ratio_covers_all_its_questions_whatever_their_order(asap, llava_next_path, images, tmp_path):
    """Each image keeps its own count on LLaVA-NeXT: the row's ratio is Eq. 8 over all of them,
    between the two images' own ratios and the same in any order."""
    ratios = []
    for number, image in enumerate(images):
        image.save(tmp_path / f"{number}.png")
        run = asap("run", tmp_path / f"{number}.png", "what is it?", "-m", llava_next_path, "--method", "vispruner",
                   "-k", 10, "--max-tokens", 1, "--json")  # fmt: skip
        ratios.append(json.loads(run.stdout)["flops_ratio"])
    assert ratios[0] != ratios[1]
    lines = [json.dumps({"image": f"{n}.png", "question": "what is it?", "answer": "no"}) for n in range(2)]
    rows = []
    for order in (lines, lines[::-1]):
        (tmp_path / "questions.jsonl").write_text("\n".join(order) + "\n")
        result = asap("eval", "--data", tmp_path / "questions.jsonl", "-m", llava_next_path,
                      "--methods", "vispruner", "-k", 10, "--max-tokens", 1, "--json")  # fmt: skip
        assert result.exit_code == 0, result.output
        rows.append(json.loads(result.stdout)["results"][-1]["flops_ratio"])
    assert min(ratios) < rows[0] < max(ratios) and rows[1] == pytest.approx(rows[0])


def test_a_vispruner_budget_that_keeps_every_patch_and_newline_prunes_nothing(next_model):
    """A square image on 2 x 2 tiles: 16 + 8 x (8 + 1) = 88 tokens; k = 85 gives each item T = 17 of
    its 16 patches, so every patch and newline is kept: nothing pruned, counted so, and no error."""
    from PIL import Image

    inputs = build_inputs(next_model.processor, [user_message("what is it?", 1)], [Image.new("RGB", (40, 40), "red")])
    with torch.inference_mode(), asapcli.pruned(next_model.model, method="vispruner", k=85) as pruning:
        next_model.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    report = pruning.report()
    (image,) = report.images
    assert image.end - image.start == 88 == len(image.kept) == report.kept_tokens
    assert report.flops_ratio == 1.0


def test_tokens_fed_out_of_step_are_refused():
    with pytest.raises(ValueError, match="1 claims, 2 states, 1 roles"):
        Fed([3], torch.zeros(2, 4), ["selected"])


def _tiles(patches: int, items: int, newlines: int, seed: int = 0) -> TiledCues:
    """A hand-made tiled image: `items` items of `patches` patches each, then `newlines` slots."""
    generator = torch.Generator().manual_seed(seed)
    width = 8

    def cues():
        query, key = (torch.randn(patches + 1, width, generator=generator) for _ in range(2))
        return VisionCues(
            torch.rand(2, patches, generator=generator), torch.randn(patches, width, generator=generator),
            torch.randn(width, generator=generator), keys=key, query_key=(query, key), project=lambda tokens: tokens,
        )  # fmt: skip

    source = torch.cat([torch.arange(items * patches), torch.full((newlines,), -1)])
    return TiledCues([cues() for _ in range(items)], source, (1, items - 1), most_items=items)


@pytest.mark.parametrize("method, kept", [(VisPruner(), 28), (VisionZip(), 8), (PruMergePlus(), 8)])
def test_a_tile_share_above_its_patches_keeps_them_all(method, kept):
    """k // 2 = 13 for items of 4 patches: each item keeps what 4 allow (VisionZip's split of 13
    would ask for more dominant patches than there are)."""
    span = SpanView(start=0, hidden=torch.randn(28, 8), vision=_tiles(patches=4, items=2, newlines=20))
    selection = method.select(span, 27)
    assert selection.kept.numel() == kept and selection.kept.unique().numel() == kept


def test_an_adaptive_count_that_reaches_the_span_keeps_it_whole():
    """PruMerge+'s adaptive count is each item's own: on a span that unpadding left hardly more
    than the base image, the items' counts can add up to more tokens than the span has."""
    tiles = _tiles(patches=4, items=5, newlines=0)
    span = SpanView(start=0, hidden=torch.randn(4, 8), vision=replace(tiles, source=torch.arange(4)))  # tiles all cut
    selection = PruMergePlus(adaptive=True).select(span, 3)  # at least a token per item: 5 for 4 slots
    assert selection.kept.tolist() == list(range(4)) and torch.equal(selection.hidden, span.hidden)


def test_a_call_that_repeats_its_images_after_encoding_is_refused(next_model, images):
    """generate()'s num_beams (and num_return_sequences) repeat the encoded images: the spans no
    longer match the images the tower saw, even after an earlier call of the same block."""
    processor, model = next_model.processor, next_model.model
    first, second = (build_inputs(processor, [user_message("what?", 1)], [image]) for image in images)
    with torch.inference_mode(), asapcli.pruned(model, method="vispruner", k=25):
        model.generate(**first, max_new_tokens=1, do_sample=False)
        with pytest.raises(UnsupportedModel, match="2 image spans where the model encoded 1 images"):
            model.generate(**second, max_new_tokens=1, do_sample=False, num_beams=2)


def test_a_per_tile_need_no_k_can_meet_is_refused_as_such():
    span = SpanView(start=0, hidden=torch.randn(28, 8), vision=_tiles(patches=4, items=2, newlines=20))
    with pytest.raises(UsageError, match="4 at k = 27, where it needs 21; an item has only 4 patches$"):
        VisionZip(contextual=20).select(span, 27)
    with pytest.raises(UsageError, match="1 at k = 3, where it needs 2; give k at least 4$"):
        VisionZip().select(span, 3)


@pytest.mark.parametrize(("method", "k", "least"), [("vispruner", 4, 5), ("visionzip", 9, 10), ("prumerge-plus", 4, 5)])
def test_a_per_tile_budget_too_small_is_refused_before_the_model_loads(
    method, k, least, asap, llava_next_path, image_file, monkeypatch
):
    """Told from the config alone (its grid pinpoints and tile size); it was refused after the load
    and the image's encoding, and under lmms-eval inside its run (a traceback, then the Error line)."""
    from asapcli.lmms_eval.arguments import ModelArgs
    from asapcli.runtime import loading

    monkeypatch.setattr(loading, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    result = asap("run", image_file, "what?", "-m", llava_next_path, "--method", method, "-k", k)
    assert result.exit_code == 2 and f"give k at least {least}" in result.stderr
    assert result.stderr.startswith(f"Error: {method} on a tiled model gives each of an image's up to 5 tower items")
    with pytest.raises(UsageError, match=f"^model_args: {method} on a tiled model .* give k at least {least}$"):
        ModelArgs.parse({"pretrained": str(llava_next_path), "method": method, "k": k})
    monkeypatch.undo()  # the least k runs
    answered = asap(
        "run", image_file, "what?", "-m", llava_next_path, "--method", method, "-k", least, "--max-tokens", 1
    )
    assert answered.exit_code == 0, answered.output
