"""Findings of the hostile passes on the third pass's code, each with the case that showed it."""

import pytest

from asapcli.errors import UsageError
from asapcli.lmms_eval.arguments import ModelArgs

CAR = "examples/car.png"


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_a_layer_given_to_a_method_in_stages_is_refused_not_ignored(method, asap):
    """Their stages follow the model's depth: --layer 3 ran exactly as --layer 9 did, without a word."""
    expected = f"{method} does not read --layer: its stages sit at fixed fractions of the model's depth"
    for args in (["run", CAR, "hi", "--method", method, "--layer", 3], ["flops", "--method", method, "--layer", 3]):
        result = asap(*args)
        assert result.exit_code == 2 and result.stderr.startswith(f"Error: {expected}"), result.output
    with pytest.raises(UsageError, match=f"{method} does not read layer"):
        ModelArgs.parse({"pretrained": "demo", "method": method, "layer": "3"})
    compared = asap("flops", "--method", "fastv", "--layer", 3, "--json")  # a method that reads it takes it
    assert compared.exit_code == 0, compared.output


def test_a_second_threads_block_on_the_same_model_says_so(llava_path):
    """Two threads each opening a block on one model were told "blocks do not nest", which none did."""
    import threading

    import asapcli
    from asapcli.runtime.loading import load

    model = load(str(llava_path), device="cpu").model
    errors = []

    def second():
        try:
            with asapcli.pruned(model, method="fastv", k=8):
                pass
        except UsageError as error:
            errors.append(str(error))

    with asapcli.pruned(model, method="fastv", k=8):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        with pytest.raises(UsageError, match="blocks do not nest"), asapcli.pruned(model, method="fastv", k=8):
            pass
    assert errors and errors[0].startswith("this model is inside an asapcli.pruned block in another thread")


@pytest.mark.parametrize("method", ["divprune", "pool"])
def test_a_cache_shortened_before_the_llm_is_not_continued_after_its_block(method, llava_path, images):
    """Inside a block a second call on a divprune-pruned cache was refused; after the block the
    same call ran, and generate() fed what it took for the missing part of the prompt again."""
    import torch

    import asapcli
    from asapcli.runtime.inputs import build_inputs, user_message
    from asapcli.runtime.loading import load

    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    more = lvlm.processor.tokenizer(" and then some", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        with asapcli.pruned(lvlm.model, method=method, k=4):
            cache = lvlm.model(**inputs, use_cache=True).past_key_values
            with pytest.raises(UsageError, match=f"{method} prunes before the first layer"):
                lvlm.model(input_ids=more, past_key_values=cache, use_cache=True)
        token = lvlm.model(input_ids=more[:, :1], past_key_values=cache, use_cache=True)  # a decoding step goes on
        assert token.logits.shape[1] == 1
        for tokens in (more[:, :2], more):  # two tokens are as many as twenty here
            with pytest.raises(UsageError, match=f"{method} prunes before the first layer, so a cache it pruned"):
                lvlm.model(input_ids=tokens, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("words", [{"COMP_WORDS": "asap run --method ", "COMP_CWORD": "abc"}, {}])
def test_a_malformed_completion_call_is_one_error_line(words):
    """A shell (or a hand) calling completion without COMP_WORDS or with a bad COMP_CWORD got a traceback."""
    import os
    import shutil
    import subprocess

    env = {**os.environ, "_ASAP_COMPLETE": "complete_bash", **words}
    result = subprocess.run([shutil.which("asap")], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: shell completion needs COMP_WORDS and a whole-number COMP_CWORD")


def test_pdrops_measured_count_says_it_holds_the_rankings_projections(llava_path, asap):
    """pdrop's measured stage ran 20x over Eq. 7 without a word: its ranking's q and k projections."""
    result = asap("flops", "-m", llava_path, "--method", "pdrop", "-k", 8, "--measure", "--threads", 1)
    assert result.exit_code == 0, result.output
    assert "pdrop ranks each stage by the layer's own q and k projections" in result.stdout
    fastv = asap("flops", "-m", llava_path, "--method", "fastv", "-k", 8, "--measure", "--threads", 1)
    assert "ranks each stage" not in fastv.stdout


def test_evals_columns_keep_one_order_whatever_the_data_files_order(asap, tmp_path):
    """The question types' columns followed the order a file first named them in: two files with
    the same questions in another order gave two tables that did not line up."""
    import json
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    lines = (examples / "questions.jsonl").read_text().splitlines()
    orders = []
    for name, chosen in (("as-is", lines), ("reversed", lines[::-1])):
        data = tmp_path / f"{name}.jsonl"
        rows = [json.loads(line) | {"image": str(examples / json.loads(line)["image"])} for line in chosen]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        result = asap("eval", "--data", data, "--methods", "vanilla", "--threads", 1, "--json")
        assert result.exit_code == 0, result.output
        orders.append(list(json.loads(result.stdout)["results"][0]["accuracy"]))
    assert orders[0] == orders[1] == ["colour", "shape", "exists", "position"]


@pytest.mark.parametrize("method, options", [("divprune", {}), ("pool", {}), ("divprune", {"positions": "renumber"})])
def test_a_decoding_step_by_hand_on_a_shortened_cache_is_generates_step(method, options):
    """A step called by hand (no position_ids) on a cache a before-LLM method shortened was placed
    at layer 0's cache length, the dropped tokens short of its true position: its logits were
    0.5-2.8 off generate()'s, and the greedy token changed."""
    import torch

    import asapcli
    from asapcli.runtime.inputs import build_inputs, load_image, user_message

    demo = asapcli.load("demo", progress=False)
    inputs = build_inputs(demo.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    with torch.inference_mode(), asapcli.pruned(demo, method=method, k=128, **options):
        reference = demo.model.generate(
            **inputs, max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        first = demo.model(**inputs, use_cache=True)
        token = first.logits[:, -1:].argmax(-1)
        second = demo.model(input_ids=token, past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(second.logits[:, -1], reference.scores[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["flops", "--schedule", "2:64", "--method", "pdrop"], "pdrop does not read --schedule"),
        (["eval", "--methods", "pdrop", "--layer", 3, "-k", 128, "--n", 2], "pdrop does not read --layer"),
        (["run", CAR, "hi", "--method", "ASAP"], "did you mean 'asap'?"),
    ],
)
def test_more_of_the_fourth_passs_cases_are_refused_in_one_line(args, message, asap):
    result = asap(*args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, result.output
    mixed = asap("flops", "--method", "fastv", "--layer", 3, "--json")  # a method that reads L in the grid: taken
    assert mixed.exit_code == 0


def test_the_api_refuses_a_layer_for_a_method_in_stages_and_a_method_that_is_none():
    import asapcli

    demo = asapcli.load("demo", progress=False)
    with pytest.raises(UsageError, match="pdrop does not read layer"), asapcli.pruned(demo, method="pdrop", layer=3):
        pass
    with pytest.raises(UsageError, match="sparsevlm does not read layer"):
        asapcli.generate(demo, CAR, "hi", method="sparsevlm", layer=5)
    with pytest.raises(UsageError, match="None is not one of vanilla"), asapcli.pruned(demo, method=None):
        pass
    with asapcli.pruned(demo, method="pdrop") as pruning:  # no layer given: its stages' own
        assert pruning.settings.method.name == "pdrop"


def test_a_budget_at_or_over_the_image_is_met_not_unmet(asap):
    """M5 of the fourth pass: k above the image's tokens keeps it whole, which is what k asks."""
    import json

    record = json.loads(asap("run", CAR, "hi", "--method", "fastv", "-k", 1000, "--threads", 1, "--json").stdout)
    assert (record["kept_tokens"], record["k_unmet"]) == (576, None)


def test_eq_8_over_prompts_is_the_ratio_of_the_sums():
    """M11: a prompt with more visual tokens weighs more (the v^2 term is per sequence)."""
    from asapcli.engine.cost import VisualFlops, eq8

    assert eq8([VisualFlops(1.0, 4.0), VisualFlops(1.0, 2.0)]) == pytest.approx(2 / 6)
    assert eq8([]) == 1.0


def test_vanilla_takes_a_layer_it_ignores(asap):
    """M19: the refusal of --layer is for methods in stages; vanilla prunes nothing and says so."""
    result = asap("run", CAR, "hi", "--method", "vanilla", "--layer", 3, "--threads", 1, "--max-tokens", 1)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kind", [1, True, ["a"], "", " colour", "two\nlines"])
def test_a_question_type_is_a_name(kind, asap, tmp_path):
    """Types that were numbers, lists or blank became columns named by Python's repr, or blank."""
    import json
    from pathlib import Path

    car = Path(__file__).resolve().parent.parent / CAR
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": str(car), "question": "what colour?", "answer": "red", "type": kind}) + "\n")
    result = asap("eval", "--data", data, "--methods", "vanilla", "--threads", 1)
    assert result.exit_code == 1 and f"{data}:1: type must be a question type's name" in result.stderr, result.output
