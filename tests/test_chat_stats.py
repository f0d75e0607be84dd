"""`asap chat`'s /stats as the user reads it through the CLI: the FLOPs it reports add up over
every image turn, and /reset forgets the images queued for the next message as well as the
dialogue; a reader that stops early ends a piped chat quietly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def second_image(tmp_path, images):
    path = tmp_path / "second.png"
    images[1].save(path)
    return path


def records(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_stats_add_up_the_flops_of_every_image_turn(asap, llava_path, image_file, second_image):
    """Two images of the same size pruned to the same k: twice the FLOPs of one, pruned,
    unpruned and saved alike."""
    transcript = f"what colour?\n/stats\n/image {second_image}\nand this one?\n/stats\n"
    result = asap("chat", image_file, "-m", llava_path, "-k", 16, "--max-tokens", 2, "--json", input=transcript)
    first_turn, one, second_turn, two = records(result)
    assert first_turn["visual_tokens"] == second_turn["visual_tokens"] == 64
    assert first_turn["kept_tokens"] == second_turn["kept_tokens"] == 16
    one, two = one["stats"], two["stats"]
    assert one["tflops"] < one["tflops_vanilla"]
    for figure in ("tflops_vanilla", "tflops", "tflops_saved"):
        assert two[figure] == pytest.approx(2 * one[figure]), figure


def test_reset_forgets_the_queued_images_too(asap, llava_path, image_file, second_image):
    transcript = f"/image {second_image}\n/stats\n/reset\n/stats\nhi\n"
    result = asap("chat", "-m", llava_path, "-k", 16, "--max-tokens", 2, "--json", input=transcript)
    queued, after_reset, turn = records(result)
    assert queued["stats"]["pending_images"] == 1
    assert (after_reset["stats"]["pending_images"], after_reset["stats"]["images"]) == (0, 0)
    assert turn["images"] == [] and turn["visual_tokens"] == 0  # the message after /reset brings none


def test_a_reader_that_stops_early_ends_a_piped_chat_quietly():
    """`asap chat ... | head -c 2`: one BrokenPipeError line per remaining turn, then exit 1."""
    car = Path(__file__).resolve().parents[1] / "examples" / "car.png"
    process = subprocess.Popen(
        [sys.executable, "-m", "asapcli", "chat", str(car)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    process.stdin.write(b"what colour is the car?\n" * 200)
    process.stdin.close()
    process.stdout.read(2)
    process.stdout.close()  # what head -c 2 does
    assert process.wait(timeout=300) == 141
    assert b"Error" not in process.stderr.read()
