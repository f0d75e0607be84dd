"""Multi-turn chat on one pruned KV cache: a scripted transcript through the CLI, equivalence
with a single prefill of the whole dialogue, and what the cache holds after each turn."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import pruned_by
from transformers import AutoModelForImageTextToText

from asapcli.engine import METHODS, PruningPlan, image_spans, make_method
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.chat import ChatSession
from asapcli.runtime.generation import to_device
from asapcli.runtime.inputs import build_inputs, user_message
from asapcli.runtime.loading import load

K, LAYER, VISUAL = 16, 2, 64  # the tiny LLaVA makes 64 visual tokens per image


@pytest.fixture
def chat(asap):
    """`asap chat ARGS` fed `input` as its stdin."""

    def run(*args, input):
        return asap("chat", *args, input=input)

    return run


@pytest.fixture(scope="module")
def lvlm(llava_path):
    return load(str(llava_path), device="cpu")


@pytest.fixture
def second_image(tmp_path, images):
    path = tmp_path / "second.png"
    images[1].save(path)
    return path


def test_transcript_through_the_cli(llava_path, image_file, second_image, chat):
    transcript = f"hi\nwhat colour is it?\n/image {second_image}\ncompare the two\n/stats\n/reset\n/exit\nnever read\n"
    result = chat(image_file, "-m", llava_path, "-k", K, "--max-tokens", 4, input=transcript)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    answers, stats = lines[:3], "\n".join(lines[3:])
    assert all(answer.strip() for answer in answers)  # three answers, one line each
    # What /stats shows a person (its figures are checked in the JSON transcript below).
    assert "images 2" in stats and "asap k=16 L=2" in stats
    assert "tokens in cache: layers 0-1: " in stats and "; layers 2-3: " in stats
    assert "KV cache:" in stats and "FLOPs saved so far" in stats
    assert "second.png will go with your next message." in result.stderr
    assert "cleared" in result.stderr


def test_json_transcript_has_one_object_per_turn(llava_path, image_file, second_image, chat):
    transcript = f"hi\nwhat colour?\n/image {second_image}\nand now?\n/stats\n"
    result = chat(image_file, "-m", llava_path, "-k", K, "--max-tokens", 3, "--json", input=transcript)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    turns, stats = records[:3], records[3]["stats"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert [t["images"] for t in turns] == [["picture.png"], [], ["second.png"]]
    assert [(t["visual_tokens"], t["kept_tokens"]) for t in turns] == [(64, 16), (0, 0), (64, 16)]
    # Later turns prefill only what is new: never an earlier image again.
    assert turns[0]["fed_tokens"] > VISUAL > turns[1]["fed_tokens"]
    assert VISUAL < turns[2]["fed_tokens"] < 2 * VISUAL
    assert stats["cache_tokens_per_layer"][0] == turns[2]["cached_tokens"]
    assert stats["turns"] == 3 and stats["tflops_saved"] > 0
    # Two images pruned to 16 of 64 tokens in layers >= 2; layers 0-1 hold every token.
    per_layer = stats["cache_tokens_per_layer"]
    assert per_layer[0] == per_layer[1] and per_layer[2] == per_layer[3]
    assert per_layer[0] - per_layer[2] == 2 * (VISUAL - K)


def test_errors_keep_the_session_and_its_cache(llava_path, image_file, chat):
    transcript = "hi\n/image missing.png\n/frobnicate\n/imag car.png\n/k zero\nstill there?\n/stats\n"
    result = chat(image_file, "-m", llava_path, "-k", K, "--max-tokens", 3, "--json", input=transcript)
    assert result.exit_code == 1  # a piped session that met an error says so at the end
    errors = result.stderr.strip().splitlines()
    assert errors == [
        "Error: image not found: missing.png",
        "Error: unknown command /frobnicate (/help lists them)",
        "Error: unknown command /imag; did you mean /image? (/help lists them)",
        "Error: /k needs a whole number of at least 1, got 'zero'",
    ]
    first, second, stats = (json.loads(line) for line in result.stdout.splitlines())
    assert second["cached_tokens"] == first["cached_tokens"] + second["fed_tokens"]  # turn 1's cache was kept
    assert stats["stats"]["images"] == 1 and stats["stats"]["pending_images"] == 0


def test_chat_usage_errors(llava_path, image_file, chat):
    result = chat("missing.png", "-m", llava_path, input="")
    assert result.exit_code == 1 and result.stderr.startswith("Error: image not found")
    result = chat(image_file, "-m", llava_path, "--layer", 9, input="")
    assert result.exit_code == 2 and "layer must be in 1..3" in result.stderr
    result = chat(image_file, "-m", llava_path, "--method", "pool", "--max-tokens", 2, input="what?\nand?\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2  # before the LLM: its cache goes on


@pytest.fixture
def replay_selection(monkeypatch):
    """Records the SpanView and budget of every select() call, and can replay them: a selection
    is scored by the prompt of the turn that brought the image, which a single prefill of the
    whole dialogue (with more text after the image) cannot see, and each image keeps the k that
    was set when it came."""
    seen = []
    replay = []

    def install(method_name):
        original = METHODS[method_name].select

        def select(self, span, k):
            if replay:
                importance, k = replay.pop(0)
                span = replace(span, importance=importance)
            seen.append((span, k))
            return original(self, span, k)

        monkeypatch.setattr(METHODS[method_name], "select", select)

    return install, seen, replay


# Every order a user can take in `asap chat`: ("image", i) queues image i, ("ask", text) is a
# turn, ("k", n) is /k n, ("reset",) is /reset.
DIALOGUES = {
    "text first, then an image": [("ask", "hello"), ("image", 0), ("ask", "what is in the picture?")],
    "an image on turn 1": [("image", 0), ("ask", "what is in the picture?"), ("ask", "and which colour?")],
    "an image on turn 2": [("ask", "hi"), ("image", 0), ("ask", "what is it?"), ("ask", "sure?")],
    "an image on turn 3": [("ask", "hi"), ("ask", "ready?"), ("image", 1), ("ask", "what is it?")],
    "two images in one turn": [("image", 0), ("image", 1), ("ask", "compare them"), ("ask", "sure?")],
    "/k between images": [("image", 0), ("ask", "what?"), ("k", 8), ("image", 1), ("ask", "and this?")],
    "kept whole, then pruned": [
        ("k", 1000), ("image", 0), ("ask", "what?"), ("k", K), ("image", 1), ("ask", "and this?"),
    ],
    "/reset, then an image": [("image", 0), ("ask", "what?"), ("reset",), ("ask", "hi"), ("image", 1), ("ask", "so?")],
}  # fmt: skip


def play(session: ChatSession, images, dialogue) -> None:
    for step, *argument in dialogue:
        if step == "image":
            session.add_image(f"image{argument[0]}", images[argument[0]])
        elif step == "ask":
            session.ask(argument[0])
        elif step == "k":
            session.set_k(argument[0])
        else:
            session.reset()


@pytest.mark.parametrize("dialogue", DIALOGUES.values(), ids=DIALOGUES.keys())
@pytest.mark.parametrize("method", ["vanilla", "fastv", "asap", "divprune", "pool"])
def test_a_dialogue_equals_one_pruned_prefill_of_it(lvlm, images, method, dialogue, replay_selection):
    install, seen, replay = replay_selection
    if method != "vanilla":
        install(method)
    session = ChatSession(lvlm, PruneSettings(method=method, k=K, layer=LAYER), max_tokens=5)
    play(session, images, dialogue)
    selections = len(_pruned_spans(session))  # those before a /reset are gone with their dialogue
    del seen[: len(seen) - selections]
    messages = session.messages + [user_message("one more?", 0)]
    features = to_device(lvlm, build_inputs(lvlm.processor, messages, session.images))  # tests/test_cuda.py: a GPU
    ids = features["input_ids"]

    # The chat path: only what the cache has not seen goes through the model.
    cached = session._reuse_cache(ids[0].tolist())
    chat_plan = PruningPlan(make_method(method), K, LAYER, spans=[])
    with torch.inference_mode(), pruned_by(lvlm.model, chat_plan):
        chat_logits = lvlm.model(input_ids=ids[:, cached:], past_key_values=session.cache, use_cache=True).logits

    # The reference: the whole dialogue in one pruned prefill; the spans the chat pruned are
    # pruned, each scored and budgeted as in its own turn; a span kept whole stays whole.
    replay.extend((span.importance, k) for span, k in seen)
    spans = image_spans(ids[0], lvlm.image_token_id)
    pruned_spans = spans if method == "vanilla" else [spans[i] for i in _pruned_spans(session)]
    single_plan = PruningPlan(make_method(method), K, LAYER, spans=pruned_spans)
    with torch.inference_mode(), pruned_by(lvlm.model, single_plan):
        single = lvlm.model(**features, use_cache=True)

    assert not replay  # every selection was replayed
    assert torch.allclose(chat_logits[0, -1], single.logits[0, -1], atol=1e-5)
    for chat_layer, single_layer in zip(session.cache.layers, single.past_key_values.layers, strict=True):
        assert chat_layer.keys.shape == single_layer.keys.shape
        assert torch.allclose(chat_layer.keys, single_layer.keys, atol=1e-5)
        assert torch.allclose(chat_layer.values, single_layer.values, atol=1e-5)


def _pruned_spans(session: ChatSession) -> list[int]:
    """Which of the dialogue's images (in order) the chat pruned."""
    pruned, index = [], 0
    for turn in session.turns:
        for _ in turn.images:
            if turn.result.pruned:
                pruned.append(index)
            index += 1
    return pruned


def test_turn_two_feeds_only_what_the_cache_has_not_seen(lvlm, images):
    session = ChatSession(lvlm, PruneSettings(method="asap", k=K, layer=LAYER), max_tokens=5)
    session.add_image("picture", images[0])
    first = session.ask("what is in the picture?")
    prompt_one = first.result.prompt_tokens
    after_one = [(layer.keys.clone(), layer.values.clone()) for layer in session.cache.layers]
    seen_one = list(session.seen)  # turn 1's prompt and its answer but the last token
    second = session.ask("and which colour?")
    ids_two = session.seen[: second.result.prompt_tokens]
    common = next(i for i, (a, b) in enumerate(zip([*seen_one, None], ids_two)) if a != b)

    assert first.result.fed_tokens == prompt_one
    # Turn 2 prefills exactly what follows the longest common prefix of the cache and the
    # re-rendered dialogue. That prefix holds all of turn 1's prompt, image included: only answer
    # tokens that the template renders differently from how they were generated are fed again
    # (here the tiny model answered with no space after "ASSISTANT:", the template adds one).
    assert common >= prompt_one
    assert second.result.fed_tokens == len(ids_two) - common
    lengths = [layer.get_seq_length() for layer in session.cache.layers]
    assert lengths == [len(session.seen)] * LAYER + [len(session.seen) - (VISUAL - K)] * 2
    for (keys, values), layer in zip(after_one, session.cache.layers):  # turn 1's entries untouched
        n = keys.shape[2] - (len(seen_one) - common)
        assert torch.equal(layer.keys[:, :, :n], keys[:, :, :n]) and torch.equal(
            layer.values[:, :, :n], values[:, :, :n]
        )


def test_a_new_image_is_pruned_in_its_own_turn_with_the_new_k(lvlm, images):
    session = ChatSession(lvlm, PruneSettings(method="fastv", k=K, layer=LAYER), max_tokens=3)
    session.add_image("first", images[0])
    session.ask("hi")
    session.set_k(8)
    session.add_image("second", images[1])
    turn = session.ask("and this one?")
    assert (turn.result.visual_tokens, turn.result.kept_tokens) == (VISUAL, 8)
    full, pruned = session.cache.layers[0].get_seq_length(), session.cache.layers[LAYER].get_seq_length()
    assert full - pruned == (VISUAL - K) + (VISUAL - 8)


def test_stopping_mid_answer_leaves_a_consistent_cache(lvlm, images):
    session = ChatSession(lvlm, PruneSettings(method="asap", k=K, layer=LAYER), max_tokens=20)
    session.add_image("picture", images[0])
    turn = session.ask("describe it", should_stop=lambda: True)
    assert turn.result.stopped and turn.result.generated_tokens == 1
    session.ask("go on")
    lengths = [layer.get_seq_length() for layer in session.cache.layers]
    assert lengths == [len(session.seen)] * LAYER + [len(session.seen) - (VISUAL - K)] * 2


def test_vanilla_chat_with_two_llava_next_images_equals_transformers(llava_next_path, images):
    lvlm = load(str(llava_next_path), device="cpu")
    session = ChatSession(lvlm, PruneSettings(method="vanilla"), max_tokens=4)
    session.add_image("first", images[0])
    session.ask("what is this?")
    session.add_image("second", images[1])
    session.ask("and this?")
    features = build_inputs(lvlm.processor, session.messages + [user_message("so?", 0)], session.images)
    cached = session._reuse_cache(features["input_ids"][0].tolist())
    with torch.inference_mode(), pruned_by(lvlm.model, None):
        chat_logits = lvlm.model(
            input_ids=features["input_ids"][:, cached:], past_key_values=session.cache, use_cache=True
        ).logits
    reference = AutoModelForImageTextToText.from_pretrained(llava_next_path).eval()
    with torch.inference_mode():
        expected = reference(**features).logits
    assert torch.allclose(chat_logits[0, -1], expected[0, -1], atol=1e-5)


@pytest.mark.parametrize("method", ["asap", "fastv"])
def test_pruning_into_a_cache_no_earlier_prefill_pruned_through_the_cli(method, llava_path, image_file, chat):
    """A text-only first turn, then an image pruned (the bundled model answers it); an image
    kept whole, then one pruned (the tiny model: two whole images overflow the demo's context)."""
    car = Path(__file__).parent.parent / "examples" / "car.png"
    text_first = chat("--method", method, "--max-tokens", 3, input=f"hello\n/image {car}\nwhat colour is the car?\n")
    assert text_first.exit_code == 0, text_first.output
    assert text_first.stdout.splitlines()[-1] == "red"
    kept_whole = chat(
        image_file, "-m", llava_path, "--method", method, "-k", 1000, "--max-tokens", 3, "--json",
        input=f"what colour?\n/k 16\n/image {image_file}\nand now?\n",
    )  # fmt: skip
    assert kept_whole.exit_code == 0, kept_whole.output
    turns = [json.loads(line) for line in kept_whole.stdout.splitlines()]
    assert [(t["visual_tokens"], t["kept_tokens"]) for t in turns] == [(64, 64), (64, 16)]


def test_any_failing_turn_keeps_the_session(llava_path, image_file, tmp_path, monkeypatch, chat):
    from PIL import Image

    import asapcli.runtime.chat

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # big.png is a decompression bomb now
    build_inputs = asapcli.runtime.chat.build_inputs

    def failing_build_inputs(processor, messages, images):
        if "boom" in str(messages[-1]):
            raise RuntimeError("something no one foresaw")
        return build_inputs(processor, messages, images)

    monkeypatch.setattr(asapcli.runtime.chat, "build_inputs", failing_build_inputs)
    transcript = (
        "hi\n<image> hi\n/k \N{SUPERSCRIPT TWO}\n".encode()
        + b"what \xff is it?\n"
        + f"/image {tmp_path / 'big.png'}\nboom\nstill there?\n".encode()
    )
    result = chat(image_file, "-m", llava_path, "-k", K, "--max-tokens", 3, "--json", input=transcript)
    assert result.exit_code == 1, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("Error: ") for line in errors), errors
    assert "<image>" in errors[0] and "/image PATH" in errors[0]
    assert "/k needs a whole number" in errors[1]
    assert "not valid UTF-8" in errors[2]
    assert "big.png" in errors[3] and "pixels" in errors[3]
    assert "RuntimeError: something no one foresaw" in errors[4]
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert second["turn"] == 2 and second["images"] == []  # the refused image never joined the dialogue
    assert second["cached_tokens"] == first["cached_tokens"] + second["fed_tokens"]


def test_a_turn_that_fails_inside_the_model_changes_nothing(lvlm, images, monkeypatch):
    session = ChatSession(lvlm, PruneSettings(method="asap", k=K, layer=LAYER), max_tokens=4)
    session.add_image("picture", images[0])
    session.ask("what is in the picture?")
    before = (list(session.seen), [layer.get_seq_length() for layer in session.cache.layers], len(session.messages))
    last_layer = lvlm.decoder.decoder.layers[-1]
    monkeypatch.setattr(last_layer, "forward", lambda *args, **kwargs: 1 / 0)  # after layers 0-2 cached the turn
    session.add_image("second", images[1])
    with pytest.raises(ZeroDivisionError):
        session.ask("and this one?")
    monkeypatch.undo()
    after = (list(session.seen), [layer.get_seq_length() for layer in session.cache.layers], len(session.messages))
    assert after == before and len(session.turns) == 1 and len(session.pending) == 1  # the image waits
    answer = session.ask("and this one?").result.text

    fresh = ChatSession(lvlm, PruneSettings(method="asap", k=K, layer=LAYER), max_tokens=4)
    fresh.add_image("picture", images[0])
    fresh.ask("what is in the picture?")
    fresh.add_image("second", images[1])
    assert fresh.ask("and this one?").result.text == answer
    assert [layer.get_seq_length() for layer in fresh.cache.layers] == [
        layer.get_seq_length() for layer in session.cache.layers
    ]


def test_json_chat_keeps_stdout_json_lines(llava_path, image_file, chat):
    result = chat(image_file, "-m", llava_path, "--max-tokens", 2, "--json", input="/help\nhi\n/stats\n")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [min(record) for record in records] == ["answer", "stats"]
    assert "/image PATH" in result.stderr


def test_chat_says_when_the_dialogue_no_longer_fits(llava_path, image_file, chat):
    # The tiny model holds 4096 positions; its tokenizer makes one token per character.
    transcript = f"hi\n{'x' * 4100}\n/reset\nhi again\n"
    result = chat(image_file, "-m", llava_path, "--max-tokens", 2, "--json", input=transcript)
    assert result.exit_code == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: the dialogue no longer fits the model's context") and "/reset" in error
    assert [json.loads(line)["turn"] for line in result.stdout.splitlines()] == [1, 1]


def test_an_image_path_pasted_in_quotes(llava_path, image_file, tmp_path, chat):
    spaced = tmp_path / "my picture.png"
    spaced.write_bytes(image_file.read_bytes())
    result = chat("-m", llava_path, "--max-tokens", 2, input=f'/image "{spaced}"\nwhat is it?\n')
    assert result.exit_code == 0, result.output
    assert "my picture.png will go with your next message." in result.stderr


def test_the_prompt_keeps_its_history_between_sessions(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    from asapcli.commands.chat import history_path, line_editing

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readline.clear_history()
    with line_editing(interactive=True):
        readline.add_history("how many cars?")
    assert history_path() == tmp_path / "asap" / "chat_history"
    assert "how many cars?" in history_path().read_text()
    readline.clear_history()
    with line_editing(interactive=True):
        assert readline.get_history_item(readline.get_current_history_length()) == "how many cars?"
    readline.clear_history()


def test_a_question_with_no_image_in_the_dialogue_gets_a_hint_once(llava_path, image_file, chat):
    hint = "No image in the dialogue yet: /image PATH adds one to your next message."
    result = chat("-m", llava_path, "--max-tokens", 2, input="hi\nand now?\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count(hint) == 1
    result = chat(image_file, "-m", llava_path, "--max-tokens", 2, input="hi\n")
    assert hint not in result.stderr


def test_queued_images_that_do_not_fit_can_be_dropped_and_the_dialogue_goes_on(image_file, chat):
    """The demo model's 1,024 positions hold one image of 576 tokens, not two."""
    result = chat(
        image_file, "--max-tokens", 2, "--json",
        input=f"what colour is the car?\n/image {image_file}\nand this one?\n/drop\nand the car?\n",
    )  # fmt: skip
    assert result.exit_code == 1  # the piped session met an error
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "and the 1 queued image(s) (/drop forgets them)" in errors[0]
    assert f"Dropped {image_file.name}." in result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [turn["turn"] for turn in turns] == [1, 2]  # the turn after /drop answered


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm", "asap"])
def test_stats_names_the_layer_the_method_pruned_after_as_run_does(llava_path, image_file, chat, asap, method):
    """pdrop and sparsevlm prune in stages from their own first layer, whatever --layer says."""
    result = chat(
        image_file, "-m", llava_path, "--method", method, "-k", 16, "--max-tokens", 2, "--json", input="hi\n/stats\n"
    )
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout.splitlines()[-1])["stats"]
    run = asap("run", image_file, "hi", "-m", llava_path, "--method", method, "-k", 16, "--max-tokens", 2, "--json")
    assert stats["layer"] == json.loads(run.stdout)["layer"]
    assert (stats["layer"] == 2) == (method == "asap")


def test_after_forget_the_images_left_are_read_again_with_their_pixels(lvlm, images):
    """/forget starts the cache over, and the next turn prefills what is left of the dialogue: its
    images went without their pixels (the model read their tokens as text, no error), as if they
    were still cached. Found by the hostile pass of session 16."""
    session = ChatSession(lvlm, PruneSettings("vanilla"), max_tokens=3)
    play(session, images, [("image", 0), ("ask", "what is it?"), ("image", 1), ("ask", "and this?")])
    session.forget_oldest_image()
    session.ask("still?")
    features = build_inputs(lvlm.processor, session.messages + [user_message("one more?", 0)], session.images)
    ids = features["input_ids"]
    cached = session._reuse_cache(ids[0].tolist())
    with torch.inference_mode():
        chat_logits = lvlm.model(input_ids=ids[:, cached:], past_key_values=session.cache, use_cache=True).logits
        single = lvlm.model(**features).logits
    assert len(session.images) == 1 and torch.allclose(chat_logits[0, -1], single[0, -1], atol=1e-5)


def test_k_set_in_chat_is_checked_as_minus_k_is(llava_next_path):
    """/k 3 with vispruner on LLaVA-NeXT was taken, then every turn with an image refused it."""
    from asapcli.commands.chat import banner
    from asapcli.errors import UsageError

    lvlm = load(str(llava_next_path), device="cpu")
    session = ChatSession(lvlm, PruneSettings("vispruner", k=10))
    with pytest.raises(UsageError, match="give k at least"):
        session.set_k(3)
    assert session.settings.k == 10
    assert "(vispruner, k=10, L=0)" in banner("nx", session)  # it prunes before layer 0, whatever --layer says
