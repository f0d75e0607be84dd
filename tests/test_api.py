"""`asapcli.pruned`, the Python API: pruning any transformers LVLM inside a `with` block, the
same engine the CLI drives, and a model left as it was outside the block."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import pruned_by
from transformers import AutoModelForImageTextToText

import asapcli
from asapcli.engine import PrunedDecoder, UnsupportedModel, image_spans
from asapcli.engine.cost import token_flops
from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.errors import UsageError
from asapcli.runtime.inputs import build_batch_inputs, build_inputs, user_message
from asapcli.runtime.loading import load


def fresh(path):
    return AutoModelForImageTextToText.from_pretrained(path).eval()


def test_outside_the_block_the_model_is_untouched(llava_path, images):
    model, reference = fresh(llava_path), fresh(llava_path)
    own_decoder = model.get_decoder()
    inputs = build_inputs(load(str(llava_path), device="cpu").processor, [user_message("what?", 1)], images[:1])
    with torch.inference_mode():
        expected = reference(**inputs).logits
        with asapcli.pruned(model, method="asap", k=8):
            assert isinstance(model.get_decoder(), PrunedDecoder)
            assert model(**inputs).logits.shape[1] < expected.shape[1]  # pruned inside
        assert model.get_decoder() is own_decoder
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("method, options", [("asap", {"merge_threshold": 0.5}), ("fastv", {}), ("divprune", {})])
def test_generate_inside_the_block_is_the_engine_driven_with_its_plan(method, options, llava_path, images):
    """The block finds the spans and plans them itself; the engine driven directly with the plan
    made by hand answers the same and keeps the same tokens."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what is it?", 1)], images[:1])
    plan = plan_for(lvlm, inputs["input_ids"][0], PruneSettings(method, k=8, layer=2, **options))
    with torch.inference_mode(), pruned_by(lvlm.model, plan) as by_hand:
        expected = lvlm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    done = by_hand.prefills[0]

    model = fresh(llava_path)
    with torch.inference_mode(), asapcli.pruned(model, method=method, k=8, layer=2, **options) as pruning:
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    report = pruning.report()
    assert [image.kept for image in report.images] == [record.kept.tolist() for record in done.pruned()]
    assert (report.visual_tokens, report.kept_tokens, report.merged_tokens) == (64, 8, done.prompt().merged_tokens)
    assert report.layer == plan.layer
    text_config = model.config.get_text_config()
    assert report.flops_ratio == pytest.approx(token_flops(text_config, 64, 8, report.layer).ratio)


def test_a_padded_batch_reports_each_prompt_in_its_own_tokens(llava_next_path, images):
    """LLaVA-NeXT tiles the two images differently: the rows differ in length and are padded."""
    lvlm = load(str(llava_next_path), device="cpu")
    prompts = ["what is it?", "where is the blue thing?"]
    batch = build_batch_inputs(lvlm.processor, list(zip(prompts, images, strict=True)))
    model = fresh(llava_next_path)
    with torch.inference_mode(), asapcli.pruned(model, method="fastv", k=8) as pruning:
        model(**batch)
    report = pruning.report()
    assert [image.row for image in report.images] == [0, 1]
    for image, prompt, picture in zip(report.images, prompts, images, strict=True):
        single = build_inputs(lvlm.processor, [user_message(prompt, 1)], [picture])
        expected = plan_for(lvlm, single["input_ids"][0], PruneSettings("fastv", k=8))
        with torch.inference_mode(), pruned_by(lvlm.model, expected) as by_hand:
            lvlm.model(**single)
        assert [(image.start, image.end)] == list(expected.spans)
        assert image.kept == by_hand.prefills[0].pruned()[0].kept.tolist()


def test_a_call_that_continues_a_cache_prunes_only_its_new_image(llava_path, images):
    """A prompt with two images fed in two calls, as a chat's turns are: each call prunes the
    image it brings, at its position in the whole sequence."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what is where?", 2)], images)
    ids = inputs["input_ids"]
    (first_start, first_end), (second_start, second_end) = image_spans(ids[0], lvlm.image_token_id)
    model = fresh(llava_path)
    with torch.inference_mode(), asapcli.pruned(model, method="asap", k=8) as pruning:
        out = model(input_ids=ids[:, :second_start], pixel_values=inputs["pixel_values"][:1], use_cache=True)
        model(input_ids=ids[:, second_start:], pixel_values=inputs["pixel_values"][1:],
              past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
    report = pruning.report()
    assert [(image.start, image.end) for image in report.images] == [
        (first_start, first_end),
        (second_start, second_end),
    ]
    for image in report.images:
        assert len(image.kept) == 8 and all(image.start <= position < image.end for position in image.kept)
    assert (report.visual_tokens, report.kept_tokens) == (128, 16)
    lengths = [layer.get_seq_length() for layer in out.past_key_values.layers]
    assert lengths == [ids.shape[1]] * 2 + [ids.shape[1] - 2 * (64 - 8)] * 2


def test_options_are_checked_as_the_cli_checks_them(llava_path):
    model = fresh(llava_path)
    with (
        pytest.raises(UsageError, match="^lambda_max is not an option of fastv"),  # the keyword, as called
        asapcli.pruned(model, method="fastv", lambda_max=0.5),
    ):
        pass
    with pytest.raises(UsageError, match="layer must be in 1..3"), asapcli.pruned(model, layer=4):
        pass
    assert not isinstance(model.get_decoder(), PrunedDecoder)  # a refused block changes nothing


def test_the_readme_example_runs_as_shown():
    """The README's first Python example, extracted and run from the checkout (offline, bundled
    model); the second is a fragment about the user's own model, its block tested above."""
    checkout = Path(__file__).parent.parent
    code = (checkout / "README.md").read_text().split("## Python API", 1)[1].split("```python\n", 1)[1]
    result = subprocess.run(
        [sys.executable, "-c", code.split("```", 1)[0]], cwd=checkout, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["red", "128", "576", "57.6%"]  # as its comment says


def test_a_budget_at_or_above_the_image_prunes_nothing_and_reports_so(llava_path, images):
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    model, reference = fresh(llava_path), fresh(llava_path)
    with torch.inference_mode(), asapcli.pruned(model, method="asap", k=64) as pruning:
        logits = model(**inputs).logits
    assert torch.equal(logits, reference(**inputs).logits)
    report = pruning.report()
    assert [image.kept for image in report.images] == [None]
    assert (report.visual_tokens, report.kept_tokens, report.flops_ratio) == (64, 64, 1.0)


def test_vanilla_prunes_nothing_and_reports_so_whatever_its_k(llava_path, images):
    """vanilla under a k below the image's tokens (k is the budget of the other methods): the
    report reads as a budget at or above the image does, not as a pruned span with no kept list."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    model, reference = fresh(llava_path), fresh(llava_path)
    with torch.inference_mode(), asapcli.pruned(model, method="vanilla", k=8) as pruning:
        logits = model(**inputs).logits
    assert torch.equal(logits, reference(**inputs).logits)
    report = pruning.report()
    assert [image.kept for image in report.images] == [None]
    assert (report.visual_tokens, report.kept_tokens, report.flops_ratio) == (64, 64, 1.0)


def test_the_flops_ratio_of_several_prompts_is_their_total_over_the_unpruned_total(llava_path, images):
    """Eq. 8's attention term grows with the square of a sequence's tokens: two prompts of 64
    visual tokens cost twice one prompt, not what one prompt of 128 would."""
    lvlm = load(str(llava_path), device="cpu")
    batch = build_batch_inputs(lvlm.processor, [("what is it?", images[0]), ("and this?", images[1])])
    model = fresh(llava_path)
    with torch.inference_mode(), asapcli.pruned(model, method="fastv", k=8) as pruning:
        model(**batch)
    report = pruning.report()
    text_config = model.config.get_text_config()
    assert (report.visual_tokens, report.kept_tokens) == (128, 16)
    assert report.flops_ratio == pytest.approx(token_flops(text_config, 64, 8, report.layer).ratio)


def test_what_the_block_cannot_do_is_refused_not_done_wrong(llava_path, images):
    """Found by a hostile tester: each of these ran and gave a wrong or missing result."""
    inputs = build_inputs(load(str(llava_path), device="cpu").processor, [user_message("what?", 1)], images[:1])
    model = fresh(llava_path)
    with torch.inference_mode(), asapcli.pruned(model, k=8):
        with pytest.raises(UsageError, match="blocks do not nest"), asapcli.pruned(model, k=16):
            pass
        with pytest.raises(UsageError, match="output_hidden_states is not available"):
            model(**inputs, output_hidden_states=True)
    for bad, name in (({"layer": 2.5}, "layer"), ({"k": 8.0}, "k"), ({"k": True}, "k"), ({"k": "8"}, "k")):
        with pytest.raises(UsageError, match=f"{name} must be a whole number"), asapcli.pruned(model, **bad):
            pass
    with torch.inference_mode(), asapcli.pruned(model, method="divprune", k=8, layer=0) as pruning:
        out = model(**inputs, use_cache=True)
        assert pruning.report().layer == 0
        longer = torch.cat([inputs["input_ids"], inputs["input_ids"][:, -3:]], dim=1)
        with pytest.raises(UsageError, match="cannot be continued"):
            model(input_ids=longer[:, -5:], past_key_values=out.past_key_values, use_cache=True)
    with asapcli.pruned(model, method="pool", k=4) as pruning:
        pass
    assert pruning.report().layer == 0  # what pool does, also when nothing ran
    assert torch.equal(model(**inputs).logits, fresh(llava_path)(**inputs).logits)  # restored after each error


def test_a_text_only_model_is_refused_on_entry(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModel, match="no image_token_id"), asapcli.pruned(model):
        pass
    # its default layer 2 is out of its range too: the missing image token is what is named
    with pytest.raises(UnsupportedModel, match="no image_token_id"), asapcli.pruned(model, layer=5):
        pass


@pytest.mark.parametrize("layers, words", [(0, "0 decoder layers, so none"), (1, "1 decoder layer, so none")])
def test_a_model_too_shallow_to_prune_after_a_layer_says_so(layers, words):
    with pytest.raises(UsageError, match=words):
        PruneSettings("asap", 64, 1).for_model(layers)
    assert PruneSettings("divprune", 64, 1).for_model(layers).num_layers == layers  # before the first: no L


def test_load_and_generate_answer_as_asap_run(asap):
    """The README's five lines: asapcli.load and asapcli.generate give what `asap run --json` gives."""
    car = Path(__file__).resolve().parents[1] / "examples" / "car.png"
    model = asapcli.load("demo")
    result = asapcli.generate(model, str(car), "what colour is the car?", method="fastv", k=64, max_tokens=4)
    run = asap("run", car, "what colour is the car?", "--method", "fastv", "-k", 64, "--max-tokens", 4, "--json")
    expected = json.loads(run.stdout)
    assert (result.text, result.kept_tokens, result.visual_tokens) == (
        expected["answer"],
        64,
        expected["visual_tokens"],
    )
    assert result.flops_ratio == expected["flops_ratio"] and result.kept_positions
    with pytest.raises(UsageError, match="k needs a whole number|k must be"):
        asapcli.generate(model, str(car), "what?", k=0)


@pytest.fixture(scope="module")
def loaded(llava_path):
    return asapcli.load(str(llava_path))


@pytest.mark.parametrize("prompt", [None, "", "   ", 5])
def test_generate_refuses_a_prompt_the_cli_refuses(loaded, images, prompt):
    with pytest.raises(UsageError, match="prompt"):
        asapcli.generate(loaded, images[0], prompt, k=16)


@pytest.mark.parametrize("image", [None, 123, b"\x89PNG", [1, 2]])
def test_generate_says_what_an_image_must_be(loaded, image):
    with pytest.raises(UsageError, match=f"image must be a path or a PIL image, got {type(image).__name__}"):
        asapcli.generate(loaded, image, "what colour?", k=16)


def test_generate_and_pruned_say_which_model_they_take(loaded, images):
    with pytest.raises(UsageError, match=r"generate\(\) takes what asapcli.load\(\) returned"):
        asapcli.generate(loaded.model, images[0], "what colour?", k=16)
    with pytest.raises(UsageError, match=r"pruned\(\) takes a transformers vision-language model"):
        asapcli.pruned("demo", k=16)
    with pytest.raises(UsageError, match=r"load\(\) takes a preset name"):
        asapcli.load(5)


def test_pruned_takes_what_load_returned_and_can_be_entered_again(loaded, images):
    inputs = build_inputs(loaded.processor, [user_message("what colour?", 1)], [images[0]])
    block = asapcli.pruned(loaded, method="fastv", k=16)  # the Loaded itself, as the README calls both `model`
    reports = []
    for _ in range(2):
        with torch.inference_mode(), block as pruning:
            loaded.model(**inputs)
        reports.append(pruning.report())
    assert reports[0] == reports[1] and reports[0].kept_tokens == 16
    with block, pytest.raises(UsageError, match="do not nest"), block:
        pass
    with block as pruning:  # the refused inner entry left the outer block as it was
        loaded.model(**inputs)
    assert pruning.report().kept_tokens == 16


def test_the_api_names_the_keyword_the_caller_passed(loaded):
    """It said "--merge-threshold is not an option of fastv" to a caller who wrote merge_threshold."""
    with pytest.raises(
        UsageError, match=r"^merge_threshold is not an option of fastv \(fastv takes score_queries, score, kv_cache\)"
    ):
        asapcli.pruned(loaded, method="fastv", k=16, merge_threshold=0.5)
    with pytest.raises(UsageError, match=r"^lambda_max must be in \(0, 1\], got 2"):
        asapcli.generate(loaded, "unused.png", "what?", method="asap", k=16, lambda_max=2)


def test_load_prints_no_progress_bar_unless_asked(llava_path):
    script = f"import asapcli; asapcli.load({str(llava_path)!r}); print('done')"
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert quiet.returncode == 0 and quiet.stdout == "done\n" and "Loading weights" not in quiet.stderr
    shown = f"import asapcli; asapcli.load({str(llava_path)!r}, progress=True); print('done')"
    loud = subprocess.run([sys.executable, "-c", shown], capture_output=True, text=True, check=False)
    assert "Loading weights" in loud.stderr


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be a whole number of at least 1, got 0"),
        ({"max_tokens": "2"}, "max_tokens must be a whole number"),
        ({"temperature": -1}, "temperature must be a finite number of at least 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": "0.5"}, "temperature must be a number"),
    ],
)
def test_generate_refuses_what_the_cli_refuses_in_its_keywords(loaded, images, keywords, message):
    """They raised transformers' ValueError or a TypeError, or (temperature=-1) decoded greedily."""
    with pytest.raises(UsageError, match=re.escape(message)):
        asapcli.generate(loaded, images[0], "what?", k=16, **keywords)


def test_generate_refuses_an_image_placeholder_in_the_prompt(loaded, images):
    with pytest.raises(UsageError, match="image"):
        asapcli.generate(loaded, images[0], "what is <image> here?", k=16)
