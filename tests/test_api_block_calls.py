"""`asapcli.pruned` over several calls, as lmms-eval and hand-written loops use it: batches and
single prompts one after another in one block answer as each would alone, the model's own
config flags that the pruned decoder cannot honour are refused, a cache filled outside the
block can be continued inside it, and random pruning draws each image of a prompt afresh."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

import asapcli
from asapcli.errors import UsageError
from asapcli.runtime.inputs import build_batch_inputs, build_inputs, user_message
from asapcli.runtime.loading import load


def fresh(path):
    return AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def processor(llava_path):
    return load(str(llava_path), device="cpu").processor


def greedy(model, inputs, tokens=6):
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


# fastv leaves the batch's padding of its pruned layers; renumbered divprune, each row's shift.
@pytest.mark.parametrize("method, options", [("fastv", {}), ("divprune", {"positions": "renumber", "layer": 0})])
def test_a_padded_batch_then_a_single_prompt_in_one_block_answer_as_apart(
    method, options, llava_path, processor, images
):
    """lmms-eval answers several batches inside one block: what pruning the padded batch left
    behind (its padding, its renumbering) must not reach the next prompt."""
    batch = build_batch_inputs(processor, [("what is it?", images[0]), ("where is the blue thing now?", images[1])])
    assert (batch["attention_mask"] == 0).any()  # the rows differ in length: padded
    single = build_inputs(processor, [user_message("what colour?", 1)], images[1:])
    model = fresh(llava_path)
    with torch.inference_mode():
        with asapcli.pruned(model, method=method, k=8, **options):
            alone = greedy(model, single)
        with asapcli.pruned(model, method=method, k=8, **options) as pruning:
            batched = greedy(model, batch)
            after_the_batch = greedy(model, single)
            again = greedy(model, batch)
    assert after_the_batch == alone
    assert again == batched
    assert [image.row for image in pruning.report().images] == [0, 1, 0, 0, 1]


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_the_models_own_config_asking_for_hidden_states_or_attentions_is_refused(flag, llava_path, processor, images):
    """Set on the model's config rather than passed to the call: the pruned decoder would return
    None for them without a word."""
    inputs = build_inputs(processor, [user_message("what?", 1)], images[:1])
    model = AutoModelForImageTextToText.from_pretrained(llava_path, attn_implementation="eager").eval()
    setattr(model.config, flag, True)  # (transformers takes output_attentions with eager attention only)
    with (
        torch.inference_mode(),
        asapcli.pruned(model, method="asap", k=8),
        pytest.raises(UsageError, match=f"{flag} is not available"),
    ):
        model(**inputs)


@pytest.mark.parametrize("method", ["divprune", "pool"])
def test_a_cache_filled_outside_the_block_is_continued_inside_it(method, llava_path, processor, images):
    """Methods that prune before the first layer refuse to continue a cache they pruned; one the
    block never pruned (filled before it) continues as the plain model would."""
    inputs = build_inputs(processor, [user_message("what?", 1)], images[:1])
    more = processor.tokenizer(" and then some", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert more.shape[1] > 1
    model, reference = fresh(llava_path), fresh(llava_path)
    with torch.inference_mode():
        expected = reference(input_ids=more, past_key_values=reference(**inputs, use_cache=True).past_key_values)
        cache = model(**inputs, use_cache=True).past_key_values
        with asapcli.pruned(model, method=method, k=4):
            got = model(input_ids=more, past_key_values=cache, use_cache=True)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)


def test_random_pruning_draws_each_image_of_a_prompt_afresh_and_repeats_itself(llava_path, processor, images):
    inputs = build_inputs(processor, [user_message("what is where?", 2)], images)
    model = fresh(llava_path)
    patterns = []
    for _ in range(2):
        with torch.inference_mode(), asapcli.pruned(model, method="random", k=8, seed=5) as pruning:
            model(**inputs)
        patterns.append([[p - image.start for p in image.kept] for image in pruning.report().images])
    first, second = patterns[0]
    assert len(first) == len(second) == 8
    assert first != second  # the same 8 of 64 for both images would be no random draw per image
    assert patterns[1] == patterns[0]  # seeded: the same draw every time


def test_another_threads_call_inside_a_block_is_refused_not_pruned(llava_path, images):
    """A plain call from a second thread while a block was open came back pruned ([1, 11, V] for
    [1, 586, V]): the block's decoder state belongs to its own thread."""
    import threading

    model = AutoModelForImageTextToText.from_pretrained(llava_path).eval()
    inputs = build_inputs(load(str(llava_path), device="cpu").processor, [user_message("what?", 1)], images[:1])
    errors = []

    def plain_call():
        try:
            with torch.inference_mode():
                model(**inputs)
        except UsageError as error:
            errors.append(str(error))

    with asapcli.pruned(model, method="fastv", k=8):
        other = threading.Thread(target=plain_call)
        other.start()
        other.join()
    assert errors and "inside an asapcli.pruned block in another thread" in errors[0]
    with torch.inference_mode():  # after the block the model serves every thread again
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
