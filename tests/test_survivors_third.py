"""What the third mutation pass (issue 36) found the suite did not notice, each written as what a
user gets: a budget's layer in flops' JSON, two calls of one API block, LaTeX's digits, a device
that is not one, the API's seed, /forget of a turn with two images, and four older survivors
(a new sequence after a padded batch, each image its own random pattern, hidden states asked
from the config, lmms-eval's first stop string). Each test fails on its mutation (scripts/mutants.py)."""

import json
from pathlib import Path

import pytest
import torch

import asapcli
from asapcli.engine.settings import PruneSettings
from asapcli.errors import UsageError
from asapcli.runtime.chat import ChatSession
from asapcli.runtime.inputs import build_batch_inputs, build_inputs, user_message
from asapcli.runtime.loading import load

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tiny(llava_path):
    return load(str(llava_path), device="cpu")


def test_a_budgets_json_layer_is_its_first_pruning_step(asap):
    """pdrop -k 128 on LLaVA-1.5-7B prunes first after layer 1 (L = 2), then at 4 and 6."""
    result = asap("flops", "-m", "llava-1.5-7b", "--method", "pdrop", "-k", 128, "--json")
    report = json.loads(result.stdout)
    assert report["layer"] == report["stages"][0]["layers"] == 2


def test_two_calls_in_one_block_report_eq_8_over_both(tiny, images):
    """The report's FLOPs ratio sums the calls' FLOPs: two equal calls give one call's ratio."""
    inputs = build_inputs(tiny.processor, [user_message("what?", 1)], images[:1])
    ratios = []
    for calls in (1, 2):
        with torch.inference_mode(), asapcli.pruned(tiny.model, method="fastv", k=16) as pruning:
            for _ in range(calls):
                tiny.model(**inputs)
        ratios.append(pruning.report().flops_ratio)
    assert ratios[1] == pytest.approx(ratios[0]) and ratios[0] < 1


def test_latex_keeps_every_digit_as_shown(asap):
    result = asap("flops", "-m", "llava-1.5-7b", "-k", "192,128", "--format", "latex")
    assert result.exit_code == 0, result.output
    cells = [
        [cell.strip() for cell in line.rstrip("\\ ").split("&")] for line in result.stdout.splitlines() if "&" in line
    ]
    assert ["vanilla", "", "576", "3.817", "100.0", "288.00"] in cells and [
        "128",
        "2",
        "128",
        "1.020",
        "26.7",
        "78.00",
    ] in cells


def test_a_device_with_trailing_junk_is_refused_as_it_is_parsed(asap):
    result = asap("run", EXAMPLES / "car.png", "what?", "--device", "cuda:0x")
    assert result.exit_code == 2 and "'cuda:0x' is not one of auto, cpu, cuda" in result.stderr
    assert "did you mean" in result.stderr


def test_the_apis_seed_chooses_the_random_methods_tokens(tiny, images):
    kept = []
    for seed in (0, 7, 0):
        with torch.inference_mode(), asapcli.pruned(tiny, method="random", k=16, seed=seed) as pruning:
            tiny.model(**build_inputs(tiny.processor, [user_message("what?", 1)], images[:1]))
        kept.append(pruning.report().images[0].kept)
    assert kept[0] == kept[2] != kept[1]
    result = asapcli.generate(tiny, images[0], "what?", method="random", k=16, seed=7, max_tokens=1)
    assert result.pruning.spans[0].kept.tolist() == [position - 0 for position in kept[1]]


def test_forget_of_a_turn_that_brought_two_images_forgets_both(tiny, images):
    session = ChatSession(tiny, PruneSettings("asap", k=16), max_tokens=2)
    session.add_image("first", images[0])
    session.add_image("second", images[1])
    session.ask("compare them")
    assert session.forget_oldest_image() == 2 and session.images == []
    assert session.ask("and now?").result.visual_tokens == 0  # no image left to feed


def test_a_single_prompt_after_a_padded_batch_in_one_block_answers(tiny, images):
    """N12: the decoder's state after pruning a batch is not carried into the next sequence."""
    batch = build_batch_inputs(tiny.processor, [("what is it?", images[0]), ("and this much longer one?", images[1])])
    single = build_inputs(tiny.processor, [user_message("what?", 1)], images[:1])
    with torch.inference_mode(), asapcli.pruned(tiny, method="asap", k=16):
        tiny.model.generate(**batch, max_new_tokens=2, do_sample=False)
        inside = tiny.model.generate(**single, max_new_tokens=3, do_sample=False)
    with torch.inference_mode(), asapcli.pruned(tiny, method="asap", k=16):
        alone = tiny.model.generate(**single, max_new_tokens=3, do_sample=False)
    assert torch.equal(inside, alone)


def test_each_image_of_a_prompt_gets_its_own_random_pattern(tiny, images):
    """N17: the random method's seed takes each span's start, so two images do not share a pattern."""
    inputs = build_inputs(tiny.processor, [user_message("compare", 2)], [images[0], images[0]])
    with torch.inference_mode(), asapcli.pruned(tiny, method="random", k=16) as pruning:
        tiny.model(**inputs)
    first, second = pruning.report().images
    assert [p - first.start for p in first.kept] != [p - second.start for p in second.kept]


def test_hidden_states_asked_through_the_config_are_refused_inside_a_block(tiny, images):
    """N19: output_hidden_states set on the config, not the call: the pruned decoder returns none."""
    inputs = build_inputs(tiny.processor, [user_message("what?", 1)], images[:1])
    tiny.model.config.output_hidden_states = True
    try:
        with (
            torch.inference_mode(),
            asapcli.pruned(tiny, method="asap", k=16),
            pytest.raises(UsageError, match="output_hidden_states is not available"),
        ):
            tiny.model(**inputs)
    finally:
        tiny.model.config.output_hidden_states = False
