"""The methods that read the vision tower (vispruner, visionzip, prumerge-plus) on LLaVA-NeXT,
beyond their equality with the authors' pipelines (tests/test_next_tower_methods.py): the slot
rule, a padded batch and a prompt of two images (each span reads its own image's tiles), a
budget that prunes nothing, and the CLI."""

import json

import pytest
import torch

import asapcli
from asapcli.engine.methods.tower import claim_slots
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
