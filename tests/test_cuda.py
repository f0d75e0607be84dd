"""On a CUDA GPU (skipped without one; scripts/gpu-check.sh runs them): the engine against
transformers' own forward and generate() in bfloat16, a padded batch and a chat dialogue as the
CPU tests check them, profile's CUDA-event times and CUDA memory, and a random-weight model made
on the GPU in bfloat16 with no float32 copy."""

import json
from pathlib import Path

import pytest
import test_batches
import test_chat
import torch
from test_chat import replay_selection  # noqa: F401 (a fixture the chat check takes)
from tiny_models import pruned_by
from transformers import AutoModelForImageTextToText

from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.generation import generate, to_device
from asapcli.runtime.inputs import build_inputs, load_image, user_message
from asapcli.runtime.loading import load
from asapcli.runtime.presets import get_preset

pytestmark = pytest.mark.cuda
CAR = Path(__file__).parent.parent / "examples" / "car.png"


@pytest.fixture(scope="module")
def demo():
    return load("demo", device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def demo_reference():
    """The same checkpoint as transformers runs it, untouched."""
    folder = get_preset("demo").bundled_path()
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()


@pytest.fixture(scope="module")
def on_gpu(model_paths):
    """The tiny LLaVA and LLaVA-NeXT on the GPU, in float32 as the CPU tests run them."""
    return {name: load(str(path), device="cuda", dtype="float32") for name, path in model_paths.items()}


def test_vanilla_equals_transformers_in_bfloat16(demo, demo_reference):
    inputs = build_inputs(demo.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    inputs = to_device(demo, inputs)
    prompt = inputs["input_ids"].shape[1]
    plan = plan_for(demo, inputs["input_ids"][0], PruneSettings("vanilla"))
    with torch.inference_mode():
        expected = demo_reference(**inputs).logits
        expected_tokens = demo_reference.generate(**inputs, max_new_tokens=8, do_sample=False)
        with pruned_by(demo.model, plan):
            ours = demo.model(**inputs).logits
    assert ours.dtype == torch.bfloat16 and ours.device.type == "cuda"
    # bfloat16 keeps 8 bits of mantissa: the same kernels give the same logits, another
    # attention kernel may differ in the last bits of each.
    torch.testing.assert_close(ours.float(), expected.float(), atol=0.05, rtol=0.02)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))
    result = generate(demo, inputs, PruneSettings("vanilla"), max_tokens=8)
    assert result.token_ids == expected_tokens[0, prompt:].tolist()[: len(result.token_ids)]
    assert result.text == demo.processor.tokenizer.decode(expected_tokens[0, prompt:], skip_special_tokens=True).strip()
    assert result.text == "red"


@pytest.mark.parametrize("method", ["vanilla", "fastv", "asap"])
def test_a_padded_batch_on_the_gpu_equals_its_samples_one_by_one(method, on_gpu, images):
    for family in ("llava", "llava-next"):
        test_batches.test_a_padded_batch_equals_its_samples_one_by_one(family, method, "original", on_gpu, images)


@pytest.mark.parametrize("method", ["vanilla", "fastv", "asap"])
def test_a_dialogue_on_the_gpu_equals_one_pruned_prefill_of_it(method, on_gpu, images, replay_selection):  # noqa: F811
    dialogue = test_chat.DIALOGUES["an image on turn 2"]
    test_chat.test_a_dialogue_equals_one_pruned_prefill_of_it(
        on_gpu["llava"], images, method, dialogue, replay_selection
    )


def test_profile_times_with_cuda_events_and_counts_cuda_memory(asap):
    args = ["profile", "--device", "cuda", "--dtype", "bfloat16", "--methods", "vanilla,asap", "-k", "64"]
    result = asap(*args, "--repeats", "6", "--warmup", "1", "--decode-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        # the same statistics and verdict as on CPU, from CUDA events
        assert len(row["decode_step_seconds_all"]) == 8 and row["prefill_seconds_iqr"] >= 0
        assert row["time_ratio_confidence"] >= 0.95 and row["stable"] == (row["unstable"] == {})
        assert row["environment"]["gpu_driver"] is not None
        assert row["device"].startswith("cuda") and row["dtype"] == "bfloat16" and row["threads"] is None
        assert (row["time"], row["memory"]) == ("cuda_events", "cuda_max_memory_allocated")
        assert all(seconds > 0 for seconds in row["prefill_seconds_all"]) and len(row["prefill_seconds_all"]) == 6
        assert row["peak_memory_bytes"] > row["kv_cache_bytes"] > 0
        assert row["decode_tokens_per_second"] > 0
    vanilla, asap = rows
    assert asap["kv_cache_bytes"] < vanilla["kv_cache_bytes"]  # the pruned layers keep 64 of 576
    table = asap(*args, "--repeats", "1", "--warmup", "0", "--decode-tokens", "8")
    assert torch.cuda.get_device_name() in table.stdout and "CUDA-event time" in table.stdout


def test_random_weights_are_made_on_the_gpu_with_no_float32_copy():
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = load("bench", device="cuda", dtype="bfloat16")
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert {(p.device.type, p.dtype) for p in loaded.model.parameters()} == {("cuda", torch.bfloat16)}
    # Made in float32 first, the peak would be about three times the bfloat16 weights.
    assert torch.cuda.max_memory_allocated() - before < 1.2 * weights
