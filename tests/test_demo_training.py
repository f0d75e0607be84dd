"""The demo model's training pieces: answer-only labels, the schedule, and resuming."""

import sys

from asapcli.demo import scenes, train
from asapcli.runtime.random_model import build_llava


def test_labels_cover_every_answer_and_its_end_only():
    _, processor = build_llava(train.SHAPE, tokenizer=train.word_tokenizer())
    asked = scenes.scene_questions(0, 3)
    inputs = train.batch(processor, asked)
    tokenizer = processor.tokenizer
    for row, questions in enumerate(asked):
        labelled = inputs["labels"][row][inputs["labels"][row] != -100]
        assert tokenizer.convert_ids_to_tokens(labelled) == [t for q in questions for t in (q.answer, "</s>")]
    assert inputs["patch_labels"].shape == (3, 576)
    assert (inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum(dim=1).tolist() == [576] * 3
    assert (inputs["input_ids"] == tokenizer.unk_token_id).sum() == 0  # every word of the world has a token


def test_word_tokenizer_lowercases_and_knows_its_words():
    tokenizer = train.word_tokenizer()
    assert tokenizer.tokenize("What colour is the Car?") == ["what", "colour", "is", "the", "car", "?"]
    assert tokenizer.decode(tokenizer("how many")["input_ids"]) == "<unk> <unk>"


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert train.learning_rate(0, 1000, 1.0) == 0.01
    assert train.learning_rate(99, 1000, 1.0) == 1.0
    assert abs(train.learning_rate(1000, 1000, 1.0) - 0.1) < 1e-9


def test_learning_rate_cools_down_linearly_to_zero_after_the_decay():
    assert abs(train.learning_rate(800, 1000, 1.0, decay_steps=800) - 0.1) < 1e-9
    assert abs(train.learning_rate(900, 1000, 1.0, decay_steps=800) - 0.05) < 1e-9
    assert train.learning_rate(1000, 1000, 1.0, decay_steps=800) == 0.0
    assert train.learning_rate(500, 1000, 1.0, decay_steps=800) < train.learning_rate(500, 1000, 1.0)  # decays sooner


def test_training_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    common = [
        "train",
        "--out",
        str(tmp_path),
        "--batch",
        "2",
        "--vision-steps",
        "1",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "1000",
        "--threads",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", [*common, "--steps", "2"])
    train.main()
    monkeypatch.setattr(sys, "argv", [*common, "--steps", "3"])
    train.main()
    output = capsys.readouterr().out
    assert "resumed at step 2" in output
    monkeypatch.setattr(sys, "argv", [*common, "--export", str(tmp_path / "model")])
    train.main()
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "chat_template.jinja").exists()
