"""`asap eval` and `asap run --save-kept`: accuracy tables, plots, and the kept-patch picture."""

import json

import pytest
from PIL import Image, ImageChops
from typer.testing import CliRunner

from asapcli import evaluation
from asapcli.cli import app
from asapcli.demo import scenes
from asapcli.generation import PruneSettings

runner = CliRunner()


def asap(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def test_eval_json_has_every_method_and_budget(tmp_path):
    plot, profile = tmp_path / "accuracy.png", tmp_path / "attention.png"
    result = asap(
        "eval",
        "--n",
        8,
        "--methods",
        "vanilla,fastv,random,asap",
        "-k",
        "128,64",
        "--json",
        "--plot",
        plot,
        "--attention-profile",
        profile,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = [(row["method"], row["k"]) for row in data["results"]]
    assert rows == [("vanilla", None)] + [(m, k) for k in (128, 64) for m in ("fastv", "random", "asap")]
    for row in data["results"]:
        assert row["questions"] == 8
        assert set(row["accuracy"]) == set(scenes.QUESTION_TYPES)
        assert all(0 <= value <= 1 for value in row["accuracy"].values())
    by_k = {row["k"]: row["flops_ratio"] for row in data["results"]}
    assert by_k[None] == 1.0 and 0 < by_k[64] < by_k[128] < 1
    attention = data["attention_profile"]
    assert len(attention["causal"]) == len(attention["sg_bimask"]) == 24  # one value per image row
    assert 0 < sum(attention["causal"]) <= 1 + 1e-6  # the image's share of one softmax row
    assert Image.open(plot).format == "PNG" and Image.open(profile).format == "PNG"


def test_eval_in_batches_scores_as_one_at_a_time():
    args = ["eval", "--n", 12, "--methods", "vanilla,random,asap", "-k", 64, "--json"]
    single, batched = asap(*args, "--batch", 1), asap(*args, "--batch", 5)  # the last batch holds 2
    assert single.exit_code == 0 and batched.exit_code == 0, single.output + batched.output
    assert json.loads(batched.stdout)["results"] == json.loads(single.stdout)["results"]


def test_eval_table_and_a_question_file(tmp_path):
    data = tmp_path / "questions.jsonl"
    scenes.questions(7, 1)[0].scene.render().save(tmp_path / "scene.png")
    data.write_text('{"image": "scene.png", "question": "is there a red car?", "answer": "No."}\n\n')
    result = asap("eval", "--data", data, "--methods", "vanilla,asap", "-k", 64)
    assert result.exit_code == 0, result.output
    assert "vanilla" in result.stdout and "asap" in result.stdout and "n=1" in result.stdout


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", ":1: not JSON"),
        ('{"image": "scene.png", "question": "hi"}', ":1: missing or empty answer"),
        ('{"image": "gone.png", "question": "hi", "answer": "no"}', "image not found"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_bad_question_files_are_one_error_line(tmp_path, line, message):
    data = tmp_path / "questions.jsonl"
    data.write_text(line + "\n")
    result = asap("eval", "--data", data)
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_scoring_and_rows():
    assert evaluation.correct(" Red.", "red") and not evaluation.correct("red car", "red")
    rows = evaluation.runs(["vanilla", "fastv", "asap"], [64, 192], PruneSettings())
    assert [(row.method, row.k) for row in rows][1:] == [("fastv", 192), ("asap", 192), ("fastv", 64), ("asap", 64)]
    score = evaluation.Score(PruneSettings())
    for kind, region, hit in (("colour", "top", True), ("colour", "bottom", False), ("exists", None, True)):
        score.add(evaluation.Item(None, "q", "a", kind, region), hit)
    assert score.accuracy() == {"colour": 0.5, "exists": 1.0} and score.average == 0.75
    assert score.region_accuracy() == {"top": 1.0, "bottom": 0.0}


def lit_patches(original: Image.Image, picture: Image.Image, patch: int = 4) -> int:
    """Patches of `picture` identical to the original (the rest were darkened)."""
    lit = 0
    for top in range(0, original.height, patch):
        for left in range(0, original.width, patch):
            box = (left, top, left + patch, top + patch)
            lit += ImageChops.difference(original.crop(box), picture.crop(box)).getbbox() is None
    return lit


@pytest.mark.parametrize(
    "method, k, expected", [("asap", 64, 64), ("fastv", 128, 128), ("random", 10, 10), ("vanilla", 64, 576)]
)
def test_save_kept_lights_exactly_k_patches(tmp_path, method, k, expected):
    image = tmp_path / "scene.png"
    original = scenes.questions(3, 1)[0].scene.render()
    original.save(image)
    kept = tmp_path / "kept.png"
    result = asap(
        "run", image, "what colour is the car?", "--method", method, "-k", k, "--save-kept", kept, "--max-tokens", 2
    )
    assert result.exit_code == 0, result.output
    picture = Image.open(kept).convert("RGB")
    assert picture.size == original.size
    assert lit_patches(original, picture) == expected


def test_save_kept_maps_patches_through_the_centre_crop(tmp_path):
    wide = Image.new("RGB", (120, 96), (200, 200, 200))  # CLIP crops the middle 96 x 96
    wide.save(tmp_path / "wide.png")
    result = asap(
        "run",
        tmp_path / "wide.png",
        "hi",
        "--method",
        "vanilla",
        "--save-kept",
        tmp_path / "kept.png",
        "--max-tokens",
        1,
    )
    assert result.exit_code == 0, result.output
    picture = Image.open(tmp_path / "kept.png").convert("RGB")
    assert picture.getpixel((5, 50)) == (40, 40, 40)  # cut off by the crop: never seen, darkened
    assert picture.getpixel((60, 50)) == (200, 200, 200)  # seen and kept


def test_save_kept_needs_a_single_grid(llava_next_path, image_file, tmp_path):
    result = asap("run", image_file, "hi", "-m", llava_next_path, "--save-kept", tmp_path / "kept.png")
    assert result.exit_code == 2
    assert "not one square grid" in result.stderr and "Traceback" not in result.output
