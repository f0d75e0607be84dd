"""--top-p, --top-k and --system of run and chat, and their keywords in asapcli.generate."""

import json

import pytest

import asapcli
from asapcli.engine.settings import PruneSettings
from asapcli.errors import UsageError
from asapcli.runtime.chat import ChatSession
from asapcli.runtime.loading import load

CAR, SHAPES = "examples/car.png", "examples/shapes.png"
QUESTION = "what colour is the car?"


@pytest.fixture(scope="module")
def demo():
    return load("demo", device="cpu")


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 1e-9}])
def test_a_cut_to_the_likeliest_token_samples_what_greedy_picks(demo, cut):
    """Sampling from the single likeliest token is greedy decoding, whatever the temperature: the
    options reach generate() (without them the samples would wander from the greedy tokens)."""
    greedy = asapcli.generate(demo, CAR, QUESTION, max_tokens=8)
    for seed in range(3):
        sampled = asapcli.generate(demo, CAR, QUESTION, max_tokens=8, temperature=5.0, seed=seed, **cut)
        assert sampled.token_ids == greedy.token_ids
    wandering = [
        asapcli.generate(demo, CAR, QUESTION, max_tokens=8, temperature=5.0, seed=s).token_ids for s in range(3)
    ]
    assert any(tokens != greedy.token_ids for tokens in wandering)


def test_a_system_prompt_goes_before_the_question(demo, asap):
    plain = json.loads(asap("run", CAR, QUESTION, "--json").stdout)
    told = asap("run", CAR, QUESTION, "--system", "Answer in one word.", "--json")
    assert told.exit_code == 0, told.output
    words = len(demo.processor.tokenizer("Answer in one word.", add_special_tokens=False)["input_ids"])
    assert json.loads(told.stdout)["prompt_tokens"] >= plain["prompt_tokens"] + words
    assert (json.loads(told.stdout)["system"], plain["system"]) == ("Answer in one word.", None)  # the record says it
    result = asapcli.generate(demo, CAR, QUESTION, system="Answer in one word.", max_tokens=2)
    assert result.prompt_tokens == json.loads(told.stdout)["prompt_tokens"]


def test_forget_keeps_the_system_prompt(demo):
    session = ChatSession(demo, PruneSettings("asap"), max_tokens=2, system="Be brief.")
    session.add_image("car", _image(CAR))
    session.ask(QUESTION)
    assert session.forget_oldest_image() == 2
    assert session.messages[0]["role"] == "system" and len(session.messages) == 1
    session.reset()
    assert [message["role"] for message in session.messages] == ["system"]


def _image(path):
    from asapcli.runtime.inputs import load_image

    return load_image(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "0.9"], "top-p and top-k choose among sampled tokens: give a temperature above 0"),
        (["--top-k", "5"], "top-p and top-k choose among sampled tokens"),
        (["--temperature", "1", "--top-p", "1.5"], "top-p must be a number above 0 and at most 1, got 1.5"),
        (["--temperature", "1", "--top-k", "0"], "Invalid value for '--top-k'"),
        (["--system", " "], "--system is empty"),
        (["--system", "look at <image>"], "this model's image placeholder"),
    ],
)
def test_sampling_refusals_are_one_line(args, message, asap):
    result = asap("run", CAR, QUESTION, *args)
    assert result.exit_code in (1, 2) and len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_the_apis_keywords_are_refused_in_its_own_words(demo):
    with pytest.raises(UsageError, match="top_p and top_k choose among sampled tokens"):
        asapcli.generate(demo, CAR, QUESTION, top_k=3)
    with pytest.raises(UsageError, match="system must be a non-empty string"):
        asapcli.generate(demo, CAR, QUESTION, system="")


def test_a_system_prompt_is_checked_before_the_first_turn(asap):
    """A placeholder in it was blamed on 'the text'; one too long for the context failed every turn
    after /reset, which keeps it."""
    result = asap("run", CAR, QUESTION, "--system", "look at <image>")
    assert result.exit_code == 2 and result.stderr.startswith("Error: --system: the text contains '<image>'")
    long = "word " * 1100
    result = asap("chat", "--system", long, "--max-tokens", 2, input="hello\n")
    assert (
        result.exit_code == 2 and "--system is 1100 tokens: the model's context of 1024 leaves no room" in result.stderr
    )
