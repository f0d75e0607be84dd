"""The bundled demo model and the example scenes: what a fresh install runs on."""

import json
from pathlib import Path

from PIL import Image, ImageChops
from transformers import LlavaForConditionalGeneration

from asapcli.demo.examples import EXAMPLES, QUESTIONS
from asapcli.runtime.loading import load
from asapcli.runtime.presets import get_preset

REPO = Path(__file__).parent.parent


def test_bundled_model_loads_offline_as_a_real_llava():
    loaded = load("demo", device="cpu")
    assert type(loaded.model) is LlavaForConditionalGeneration
    assert loaded.preset.bundled_path().joinpath("model.safetensors").is_file()
    text = loaded.model.config.get_text_config()
    arch = get_preset("demo").architecture
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (
        arch.layers,
        arch.hidden,
        arch.intermediate,
    )
    vision = loaded.model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == arch.visual_tokens == 576


def test_run_without_a_model_uses_the_bundled_one(asap):
    result = asap("run", REPO / "examples" / "car.png", "what colour is the car?", "--json", "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "demo" and data["visual_tokens"] == 576 and data["kept_tokens"] == 128


def test_the_readme_example_answers_red_with_asap_on(asap):
    """The newcomer's first command, exactly: no flags, ASAP at k=128 on, the car in the top rows."""
    result = asap("run", REPO / "examples" / "car.png", "what colour is the car?")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "red"
    assert "asap k=128 L=2: kept 128/576" in result.stderr


def test_examples_are_the_committed_renders():
    for name, scene in EXAMPLES.items():
        committed = Image.open(REPO / "examples" / f"{name}.png").convert("RGB")
        assert ImageChops.difference(committed, scene.render()).getbbox() is None, name
    lines = (REPO / "examples" / "questions.jsonl").read_text().splitlines()
    assert [json.loads(line)["question"] for line in lines] == [question for _, _, question, _ in QUESTIONS]


def test_profile_runs_on_the_same_defaults(asap):
    result = asap("profile", "--k", "128", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {row["model"] for row in rows} == {"demo"}
    assert {(row["method"], row["kept_tokens"]) for row in rows} == {("vanilla", 576), ("fastv", 128), ("asap", 128)}
