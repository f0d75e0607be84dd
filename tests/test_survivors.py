"""What an independent mutation pass (45 fresh mutations, session 12) found the suite did not
notice, each written as what a user gets: the report of a multi-stage merge, the API's seed bound,
-n on a question file, a batch's token counts, the decode rate under 8 tokens, chat's /forget, the
FLOPs unit and stage ranges, the merged count in the summary, a figure's file mode and a batch's
labels."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import asapcli
from asapcli.engine.settings import PruneSettings
from asapcli.errors import UsageError
from asapcli.runtime.inputs import build_inputs, load_image, user_message
from asapcli.runtime.loading import load

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_a_later_stage_keeps_what_an_earlier_one_merged_in_the_report(llava_path, images):
    """SparseVLM's clusters from its first stage that its second keeps still carry their members."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what is where?", 1)], images[:1])
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="sparsevlm", k=16) as pruning:
        lvlm.model(**inputs)
    (image,) = pruning.report().images
    assert len(image.stages) >= 2
    carried = {position for members in image.absorbed for position in members}
    assert carried and not carried & set(image.kept)  # merged tokens are the dropped ones, named


def test_the_api_refuses_a_seed_the_cli_refuses():
    with pytest.raises(UsageError, match="seed"):
        PruneSettings("random", k=8, seed=2**32)
    assert PruneSettings("random", k=8, seed=2**32 - 1).seed == 2**32 - 1


def test_n_takes_that_many_questions_of_a_file():
    from asapcli.measure.questions import read_items

    assert len(read_items(EXAMPLES / "questions.jsonl", limit=2)) == 2


def test_a_batch_counts_its_tokens_as_each_sample_alone_does(asap):
    pictures = [EXAMPLES / "car.png", EXAMPLES / "shapes.png"]
    batch = [
        json.loads(line)
        for line in asap("run", *pictures, "-p", "what colour is the car?", "--json").stdout.split("\n")
        if line
    ]
    alone = [json.loads(asap("run", picture, "what colour is the car?", "--json").stdout) for picture in pictures]
    assert [r["generated_tokens"] for r in batch] == [r["generated_tokens"] for r in alone]
    assert [r["answer"] for r in batch] == [r["answer"] for r in alone]


def test_no_decode_rate_from_fewer_than_8_decoding_steps(llava_path, image_file, asap):
    """8 tokens are 7 decoding steps (the first comes from the prefill): too few to time."""
    record = json.loads(asap("run", image_file, "what?", "-m", llava_path, "--max-tokens", 8, "--json").stdout)
    assert record["generated_tokens"] == 8 and record["decode_tokens_per_second"] is None


def test_forget_drops_the_oldest_images_question_and_answer():
    from asapcli.runtime.chat import ChatSession

    session = ChatSession(load("demo", device="cpu"), PruneSettings("asap", k=64), max_tokens=4)
    session.add_image("car", load_image(EXAMPLES / "car.png"))
    session.ask("what colour is the car?")
    session.ask("is the car at the top or the bottom?")
    assert session.forget_oldest_image() == 2
    assert [message["role"] for message in session.messages] == ["user", "assistant"]


def test_flops_counts_in_the_unit_that_shows_them(asap):
    from asapcli.report.display import flop_unit

    assert flop_unit(0.83e9) == ("GFLOPs", 1e9) and flop_unit(0.2e12) == ("TFLOPs", 1e12)
    assert flop_unit(5e7) == ("MFLOPs", 1e6)
    table = asap("flops", "-m", "llava-1.5-7b", "-k", 128, "--layer", 2).stdout.splitlines()
    rows = [line.split() for line in table if line.split() and line.split()[0] in ("0", "1", "vanilla")]
    assert [row[1] for row in rows] == ["0..1", "2..31", "0..31"]  # first..last layer of each stage


def test_the_summary_says_how_many_were_merged(image_file, asap):
    result = asap("run", EXAMPLES / "car.png", "what colour is the car?")
    assert result.exit_code == 0
    assert (
        "kept 128/576 visual tokens (selected 2, anchor 15, refilled 111; 111 others merged into them)" in result.stderr
    )


def test_a_figure_is_written_with_the_users_umask(tmp_path, asap):
    previous = os.umask(0o022)
    try:
        result = asap("run", EXAMPLES / "car.png", "what?", "--save-kept", tmp_path / "kept.png", "--max-tokens", 1)
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "kept.png").stat().st_mode) == 0o644


def test_a_batch_of_one_prompt_labels_each_answer_by_its_image(asap):
    result = asap("run", EXAMPLES / "car.png", EXAMPLES / "shapes.png", "-p", "what colour is the car?")
    assert result.exit_code == 0, result.output
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [
        str(EXAMPLES / "car.png"),
        str(EXAMPLES / "shapes.png"),
    ]
