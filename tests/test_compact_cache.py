"""--kv-cache compact (issue 37): once the prefill is done, the layers before the first pruning
step keep only the tokens that step kept, so that every layer holds what the paper's Table 4
counts. Checked against a reference that does the same by hand: an exact prefill, its early
layers' caches cut to the text and the step's kept positions, then greedy decoding by the
model's own forward outside any block. And the SequenceCache that continues a cache whose
layer 0 was cut (compact, or a method before the language model) in a chat's later turns."""

import pytest
import torch
from transformers import DynamicCache

import asapcli
from asapcli.errors import UsageError
from asapcli.runtime.inputs import build_inputs, user_message
from asapcli.runtime.loading import load

STEPS = 5
K = 8


@pytest.fixture(scope="module")
def lvlm(llava_path):
    return load(str(llava_path), device="cpu")


@pytest.fixture(scope="module")
def inputs(lvlm, images):
    return build_inputs(lvlm.processor, [user_message("what is in the picture?", 1)], images[:1])


def prefill(lvlm, inputs, method: str, kv_cache: str, **options):
    """The prefill's cache and logits, and the positions the first pruning step kept (text and
    kept visual tokens), from its record."""
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method=method, k=K, kv_cache=kv_cache, **options) as block:
        out = lvlm.model(**inputs, use_cache=True)
    (record,) = block.prefills[0].pruned()
    first_layer, first_kept = record.stages[0]
    tokens = inputs["input_ids"].shape[1]
    text = [p for p in range(tokens) if not record.start <= p < record.end]
    return out, first_layer, sorted(text + first_kept.tolist())


def cut_by_hand(cache, layers: int, positions: list[int]) -> DynamicCache:
    """A plain DynamicCache: layers 0..layers-1 of `cache` at `positions`, the others as they are."""
    plain = DynamicCache()
    index = torch.tensor(positions)
    for number, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if number < layers:
            keys, values = keys[:, :, index], values[:, :, index]
        plain.update(keys.clone(), values.clone(), number)
    return plain


def greedy_by_hand(model, logits, cache, position: int) -> tuple[list[int], list[torch.Tensor]]:
    """STEPS greedy tokens by the model's own forward (no block: the installed decoder is gone),
    each step placed at its position in the whole sequence."""
    tokens, all_logits = [], [logits]
    with torch.inference_mode():
        for step in range(STEPS):
            token = all_logits[-1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            if step == STEPS - 1:
                break
            out = model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[position + step]]))
            all_logits.append(out.logits[:, -1])
    return tokens, all_logits


def generated(lvlm, inputs, method: str, kv_cache: str, **options):
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method=method, k=K, kv_cache=kv_cache, **options):
        return lvlm.model.generate(
            **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip


@pytest.mark.parametrize(
    "method, options",
    [("fastv", {}), ("asap", {}), ("pdrop", {}), ("pdrop", {"positions": "renumber"}), ("sparsevlm", {})],
)
def test_each_layer_holds_what_each_mode_claims(method, options, lvlm, inputs):
    """exact: layers before the first step hold every token; compact: the text and the tokens
    that step kept, the very keys and values the exact prefill computed there; the layers from
    the step on are the same in both."""
    exact, layer, kept = prefill(lvlm, inputs, method, "exact", **options)
    compact, compact_layer, compact_kept = prefill(lvlm, inputs, method, "compact", **options)
    assert (compact_layer, compact_kept) == (layer, kept) and layer >= 1
    tokens = inputs["input_ids"].shape[1]
    for number, (whole, cut) in enumerate(zip(exact.past_key_values.layers, compact.past_key_values.layers)):
        if number < layer:
            assert whole.keys.shape[2] == tokens and cut.keys.shape[2] == len(kept) < tokens
            assert torch.equal(cut.keys, whole.keys[:, :, kept]) and torch.equal(cut.values, whole.values[:, :, kept])
        else:
            assert torch.equal(cut.keys, whole.keys) and torch.equal(cut.values, whole.values)
    assert torch.equal(compact.logits, exact.logits)  # the prefill itself is the same


@pytest.mark.parametrize("method, options", [("fastv", {}), ("asap", {}), ("pdrop", {}), ("sparsevlm", {})])
def test_compact_decoding_equals_decoding_on_caches_cut_by_hand(method, options, lvlm, inputs):
    """(Renumbered positions are left out: the layers from the first step on number the decoding
    steps otherwise than those before it, which the model's own forward cannot.)"""
    exact, layer, kept = prefill(lvlm, inputs, method, "exact", **options)
    reference = cut_by_hand(exact.past_key_values, layer, kept)
    tokens, logits = greedy_by_hand(lvlm.model, exact.logits[:, -1], reference, inputs["input_ids"].shape[1])
    out = generated(lvlm, inputs, method, "compact", **options)
    assert out.sequences[0, -STEPS:].tolist() == tokens
    for step in range(STEPS):
        assert torch.allclose(out.logits[step], logits[step], atol=1e-5)
    exact_out = generated(lvlm, inputs, method, "exact", **options)
    assert torch.equal(exact_out.logits[0], out.logits[0])  # the first token comes from the prefill
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(exact_out.logits, out.logits))


@pytest.mark.parametrize("method", ["fastv", "asap"])
def test_nothing_pruned_is_vanilla_to_the_bit_in_both_modes(method, lvlm, inputs):
    tokens = int((inputs["input_ids"] == lvlm.image_token_id).sum())
    with torch.inference_mode():
        own = lvlm.model.generate(
            **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    for kv_cache in ("exact", "compact"):
        with torch.inference_mode(), asapcli.pruned(lvlm.model, method=method, k=tokens, kv_cache=kv_cache):
            out = lvlm.model.generate(
                **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        assert torch.equal(out.sequences, own.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, own.logits))


def test_a_plain_cache_compacted_is_not_continued_but_a_sequence_cache_is(lvlm, inputs):
    """After a compact prefill layer 0 holds fewer tokens than the sequence: a DynamicCache's
    length no longer says where the sequence is, a SequenceCache's does."""
    more = lvlm.processor.tokenizer(" and then some", add_special_tokens=False, return_tensors="pt")["input_ids"]
    tokens = inputs["input_ids"].shape[1]
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="fastv", k=K, kv_cache="compact"):
        plain = lvlm.model(**inputs, use_cache=True).past_key_values
        with pytest.raises(UsageError, match="fastv with --kv-cache compact cut the first layer's cache"):
            lvlm.model(input_ids=more, past_key_values=plain, use_cache=True)
        sequence = asapcli.SequenceCache(config=lvlm.model.config.get_text_config())
        lvlm.model(**inputs, past_key_values=sequence, use_cache=True)
        assert sequence.get_seq_length() == tokens and sequence.layers[0].get_seq_length() < tokens
        continued = lvlm.model(input_ids=more, past_key_values=sequence, use_cache=True).logits
    assert sequence.get_seq_length() == tokens + more.shape[1]
    # the same tokens fed one by one (what any cache continues) answer alike
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="fastv", k=K, kv_cache="compact"):
        stepped = asapcli.SequenceCache(config=lvlm.model.config.get_text_config())
        lvlm.model(**inputs, past_key_values=stepped, use_cache=True)
        for index in range(more.shape[1]):
            step = lvlm.model(input_ids=more[:, index : index + 1], past_key_values=stepped, use_cache=True).logits
            assert torch.allclose(step[0, -1], continued[0, index], atol=1e-5)


def test_compact_is_refused_where_no_layer_is_kept_whole(llava_path):
    model = load(str(llava_path), device="cpu").model
    for method in ("divprune", "vanilla"):
        with pytest.raises(UsageError, match="kv_cache compact is for methods that prune inside the language model"):
            asapcli.pruned(model, method=method, kv_cache="compact")
    asapcli.pruned(model, method="divprune", kv_cache="exact")  # what it does anyway


COMPACT_DIALOGUES = {
    "an image, then text": [("image", 0), ("ask", "what is in the picture?"), ("ask", "and which colour?")],
    "an image on turn 2, /k, another": [
        ("ask", "hi"), ("image", 0), ("ask", "what is it?"), ("k", 4), ("image", 1), ("ask", "and this?"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("dialogue", COMPACT_DIALOGUES.values(), ids=COMPACT_DIALOGUES.keys())
@pytest.mark.parametrize("method", ["fastv", "asap", "pdrop"])
def test_a_chat_continues_a_compact_cache(method, dialogue, lvlm, images):
    """Each turn's image pruned and its early layers cut in its own turn; the next turn goes on
    from the dialogue's length (a SequenceCache), as the model's own forward on a copy of that
    cache, each new token placed at its place in the dialogue, answers."""
    from test_chat import play
    from tiny_models import pruned_by

    from asapcli.engine import PruningPlan, make_method
    from asapcli.engine.settings import PruneSettings
    from asapcli.runtime.chat import ChatSession

    session = ChatSession(lvlm, PruneSettings(method, k=K, kv_cache="compact"), max_tokens=4)
    play(session, images, dialogue)
    visual = int((torch.tensor(session.seen) == lvlm.image_token_id).sum())
    held = [layer.get_seq_length() for layer in session.cache.layers]
    assert session.cache.get_seq_length() == len(session.seen) > held[0]
    if method != "pdrop":  # one step: every layer holds the text and the kept tokens alone
        kept = sum(turn.result.pruning.kept_tokens for turn in session.turns if turn.result.pruning)
        assert held == [len(session.seen) - visual + kept] * len(held)
    ids = build_inputs(lvlm.processor, session.messages + [user_message("one more?", 0)], session.images)["input_ids"]
    cached = session._reuse_cache(ids[0].tolist())
    reference = cut_by_hand(session.cache, 0, [])
    with torch.inference_mode(), pruned_by(lvlm.model, PruningPlan(make_method(method), K, 2, spans=[])):
        chat_logits = lvlm.model(input_ids=ids[:, cached:], past_key_values=session.cache, use_cache=True).logits
    with torch.inference_mode():
        positions = torch.arange(cached, ids.shape[1])[None]
        own = lvlm.model(input_ids=ids[:, cached:], past_key_values=reference, position_ids=positions).logits
    assert torch.allclose(chat_logits, own, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@pytest.mark.parametrize("method", ["fastv", "asap", "pdrop"])
def test_a_padded_batch_with_a_compact_cache_equals_its_samples_one_by_one(family, method, model_paths, images):
    """The layers cut after the prefill keep each row's batch padding and fillers (rows that
    keep fewer tokens: LLaVA-NeXT tiles the two images differently) masked out while decoding."""
    from test_batches import PROMPTS, STEPS, greedy

    from asapcli.engine.plans import plan_for
    from asapcli.engine.settings import PruneSettings

    lvlm = load(str(model_paths[family]), device="cpu")
    processor = lvlm.processor
    texts = [processor.apply_chat_template([user_message(p, 1)], add_generation_prompt=True) for p in PROMPTS]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    settings = PruneSettings(method=method, k=K, kv_cache="compact")
    batched, _ = greedy(lvlm, batch, [plan_for(lvlm, row, settings) for row in batch["input_ids"]])
    exact, _ = greedy(
        lvlm, batch, [plan_for(lvlm, row, settings.replace(kv_cache="exact")) for row in batch["input_ids"]]
    )
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched.logits[1:], exact.logits[1:]))
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        single = processor(text=text, images=[image], return_tensors="pt")
        alone, _ = greedy(lvlm, single, plan_for(lvlm, single["input_ids"][0], settings))
        assert torch.equal(batched.sequences[row, -STEPS:], alone.sequences[0, single["input_ids"].shape[1] :])
        for step in range(STEPS):
            assert torch.allclose(batched.logits[step][row], alone.logits[step][0], atol=1e-5)


def test_a_compact_prefill_that_only_scored_cuts_nothing(lvlm, inputs):
    """The attention profile's score-only plans prune nothing: a compact cache of one is whole,
    and a later call continues it as any other."""
    from tiny_models import pruned_by

    from asapcli.engine.plans import plan_for
    from asapcli.engine.settings import PruneSettings

    settings = PruneSettings("fastv", k=K, kv_cache="compact")
    more = lvlm.processor.tokenizer(" and then some", add_special_tokens=False, return_tensors="pt")["input_ids"]
    plan = plan_for(lvlm, inputs["input_ids"][0], settings, score_only=True)
    with torch.inference_mode(), pruned_by(lvlm.model, plan):
        cache = lvlm.model(**inputs, use_cache=True).past_key_values
        lvlm.model(input_ids=more, past_key_values=cache, use_cache=True)
    tokens = inputs["input_ids"].shape[1] + more.shape[1]
    assert [layer.get_seq_length() for layer in cache.layers] == [tokens] * len(cache.layers)


def test_spans_first_pruned_at_different_layers_are_each_cut_before_their_own(model_paths):
    """SparseVLM on LLaVA-NeXT: a small image's schedule starts later than a large one's. Each
    layer holds, of each image, what that image's own first step kept before it, and what the
    layer saw after it: in one prompt, and in a padded batch (each row as alone)."""
    from PIL import Image
    from test_batches import STEPS, greedy

    from asapcli.engine.plans import plan_for
    from asapcli.engine.settings import PruneSettings

    lvlm = load(str(model_paths["llava-next"]), device="cpu")
    small, car = Image.new("RGB", (64, 16), (200, 30, 30)), Image.open("examples/car.png").convert("RGB")
    settings = PruneSettings("sparsevlm", k=32, kv_cache="compact")
    both = build_inputs(lvlm.processor, [user_message("what are they?", 2)], [small, car])
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="sparsevlm", k=32, kv_cache="compact") as block:
        cache = lvlm.model(**both, use_cache=True).past_key_values
    records = block.prefills[0].pruned()
    assert len({record.stages[0][0] for record in records}) == 2  # the images start at different layers
    text = both["input_ids"].shape[1] - sum(record.end - record.start for record in records)
    for number, layer in enumerate(cache.layers):
        held = [
            next(len(kept) for at, kept in reversed(r.stages) if at <= max(number, r.stages[0][0])) for r in records
        ]
        assert layer.get_seq_length() == text + sum(held), number

    processor = lvlm.processor
    texts = [processor.apply_chat_template([user_message("what is it?", 1)], add_generation_prompt=True)] * 2
    batch = processor(text=texts, images=[small, car], return_tensors="pt", padding=True, padding_side="left")
    batched, done = greedy(lvlm, batch, [plan_for(lvlm, row, settings) for row in batch["input_ids"]])
    assert done.pruned(0)[0].stages[0][0] != done.pruned(1)[0].stages[0][0]
    for row, image in enumerate([small, car]):
        single = processor(text=texts[row], images=[image], return_tensors="pt")
        alone, _ = greedy(lvlm, single, plan_for(lvlm, single["input_ids"][0], settings))
        for step in range(STEPS):
            assert torch.allclose(batched.logits[step][row], alone.logits[step][0], atol=1e-5)


@pytest.mark.parametrize(
    "method, option",
    [("vanilla", {"kv_cache": "exact"}), ("divprune", {"kv_cache": "exact"}), ("fastv", {"positions": "original"})],
)
def test_a_value_a_method_behaves_as_anyway_is_taken_everywhere(method, option):
    """lmms-eval's model_args method=vanilla,kv_cache=exact raised an AttributeError: the value
    was kept as given to a method without that field."""
    from asapcli.engine.settings import PruneSettings
    from asapcli.lmms_eval.arguments import ModelArgs

    settings = PruneSettings(method, 8, 2, 0, **option)
    assert settings.hyperparameters == {} and repr(settings).startswith(f"PruneSettings({method!r}")
    assert ModelArgs.parse({"method": method, **option}).prune.method.name == method


def test_every_output_says_a_cache_was_compact(asap):
    """A compact run could not be told from an exact one in eval's table and records, run's
    summary, compare's lines."""
    car = "examples/car.png"
    run = asap("run", car, "what colour is the car?", "--method", "fastv", "--kv-cache", "compact", "--threads", 1)
    assert run.exit_code == 0 and "fastv k=128 L=2 (compact KV cache): kept 128/576" in run.stderr
    compare = asap("compare", car, "what?", "--methods", "vanilla,fastv", "--kv-cache", "compact", "--threads", 1)
    assert "fastv k=128 (kept 128/576, compact KV cache): " in compare.stdout
    assert "vanilla (kept 576/576): " in compare.stdout  # it takes no --kv-cache
    args = ("eval", "--n", 2, "--methods", "vanilla,fastv", "-k", 64, "--threads", 1)
    rows = __import__("json").loads(asap(*args, "--kv-cache", "compact", "--json").stdout)["results"]
    assert [row["options"].get("kv_cache") for row in rows] == [None, "compact"]
    assert "L=2, compact KV cache" in asap(*args, "--kv-cache", "compact").stdout
    assert "compact" not in asap(*args).stdout.splitlines()[0]


# The second mutation review's survivors (M01-M25), each a test that fails on it.


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_a_cut_after_tokens_cached_before_keeps_those_and_what_the_call_kept(method, lvlm, inputs):
    """A chat's image on its second turn: the layers before the step keep the earlier turn's
    tokens and the call's text and kept tokens, the very keys the exact prefill computed there,
    in order (M01, M03)."""
    prefix = lvlm.processor.tokenizer("hello there", add_special_tokens=False, return_tensors="pt")["input_ids"]
    config = lvlm.model.config.get_text_config()
    call = {key: value for key, value in inputs.items() if key != "attention_mask"}
    caches = {}
    for mode in ("exact", "compact"):
        cache = asapcli.SequenceCache(config=config)
        with torch.inference_mode(), asapcli.pruned(lvlm.model, method=method, k=K, kv_cache=mode) as block:
            lvlm.model(input_ids=prefix, past_key_values=cache, use_cache=True)
            lvlm.model(**call, past_key_values=cache, use_cache=True)
        caches[mode] = cache
    (record,) = block.prefills[-1].pruned()
    first_layer, first_kept = record.stages[0]
    everything = range(prefix.shape[1] + inputs["input_ids"].shape[1])
    kept = sorted([p for p in everything if not record.start <= p < record.end] + first_kept.tolist())
    assert caches["compact"].get_seq_length() == len(everything)
    for number in range(first_layer):
        whole, cut = caches["exact"].layers[number], caches["compact"].layers[number]
        assert torch.equal(cut.keys, whole.keys[:, :, kept]) and torch.equal(cut.values, whole.values[:, :, kept])


def test_a_sequence_cache_emptied_starts_afresh(lvlm, inputs):
    """After reset() it reports 0, not the tokens an earlier prefill cut (M08), and a new prompt
    on it inside the block is a first prefill, not a refused continuation (M10)."""
    cache = asapcli.SequenceCache(config=lvlm.model.config.get_text_config())
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="fastv", k=K, kv_cache="compact"):
        first = lvlm.model(**inputs, past_key_values=cache, use_cache=True).logits
        cache.reset()
        assert cache.get_seq_length() == 0
        plain = lvlm.model(**inputs, use_cache=True).past_key_values
        plain.reset()
        again = lvlm.model(**inputs, past_key_values=plain, use_cache=True).logits
    assert torch.equal(first, again)


def test_compact_without_a_cache_or_with_a_bare_one(lvlm, inputs):
    """use_cache=False leaves nothing to cut (M11); a DynamicCache made without a config grows
    its layers as they come (M25)."""
    with torch.inference_mode():
        with asapcli.pruned(lvlm.model, method="fastv", k=K, kv_cache="exact"):
            exact = lvlm.model(**inputs, use_cache=False).logits
        with asapcli.pruned(lvlm.model, method="fastv", k=K, kv_cache="compact"):
            compact = lvlm.model(**inputs, use_cache=False).logits
            bare = lvlm.model(**inputs, past_key_values=DynamicCache(), use_cache=True).past_key_values
    assert torch.equal(exact, compact)
    assert bare.layers[0].get_seq_length() == inputs["input_ids"].shape[1] - 64 + K


def test_a_padded_batch_on_a_sequence_cache_reports_the_sequences_length(lvlm, images):
    """Rows that keep different numbers are left-filled: the cache is as long as the longest
    row's, and the sequence as the batch's input (M24)."""
    processor = lvlm.processor
    texts = [
        processor.apply_chat_template([user_message(p, 1)], add_generation_prompt=True)
        for p in ("what?", "where is the blue thing in this picture?")
    ]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    cache = asapcli.SequenceCache(config=lvlm.model.config.get_text_config())
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="pdrop", k=K, kv_cache="compact"):
        lvlm.model(**batch, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == batch["input_ids"].shape[1] > cache.layers[0].get_seq_length()


def test_the_refusal_names_who_takes_it_and_who_does_not(llava_path):
    model = load(str(llava_path), device="cpu").model
    with pytest.raises(UsageError) as refused:
        asapcli.pruned(model, method="divprune", kv_cache="compact")
    assert str(refused.value) == (
        "kv_cache compact is for methods that prune inside the language model (asap, asap-bimask-only, fastv, pdrop, "
        "random, sparsevlm): divprune leaves no layer's cache to compact (one that prunes before the language model "
        "holds only its kept tokens in every layer already; vanilla prunes nothing)"
    )  # M15


def test_every_method_that_takes_it_defaults_to_exact():
    from asapcli.engine.methods import METHODS

    takers = [cls for cls in METHODS.values() if "kv_cache" in cls.hyperparameters()]
    assert {cls.name for cls in takers} == {"asap", "asap-bimask-only", "fastv", "pdrop", "random", "sparsevlm"}
    assert all(cls().kv_cache == "exact" and not cls().compacts for cls in takers)  # M22


def test_profile_says_which_runs_were_compact(asap):
    args = ("profile", "--methods", "vanilla,fastv", "-k", 8, "--repeats", 1, "--warmup", 0, "--decode-tokens", 2)
    rows = [
        __import__("json").loads(line) for line in asap(*args, "--kv-cache", "compact", "--json").stdout.splitlines()
    ]
    assert [row["kv_cache"] for row in rows] == [None, "compact"]  # M16: vanilla takes none
    assert "compact KV cache" in asap(*args, "--kv-cache", "compact").stdout  # M18: vanilla is in the table
    assert "compact" not in asap(*args).stdout


def test_chat_keeps_a_sequence_cache_when_it_starts_over(lvlm, images):
    """/forget and a dialogue whose cached images no longer match start a new cache: a
    SequenceCache still, so that a compact cache's next turn goes on (M20, M21)."""
    from asapcli.engine.settings import PruneSettings
    from asapcli.runtime.chat import ChatSession

    session = ChatSession(lvlm, PruneSettings("fastv", k=K, kv_cache="compact"), max_tokens=2)
    session.add_image("first", images[0])
    session.ask("what is it?")
    session.forget_oldest_image()
    assert isinstance(session.cache, asapcli.SequenceCache)
    session.add_image("second", images[1])
    session.ask("and this?")
    session.ask("sure?")  # continues the compact cache of the turn after /forget
    assert session._reuse_cache([session.seen[0] + 1, *session.seen[1:]]) == 0
    assert isinstance(session.cache, asapcli.SequenceCache)


@pytest.mark.parametrize(
    "method, options",
    [("divprune", {"positions": "renumber"}), ("vispruner", {}), ("visionzip", {}), ("prumerge-plus", {})],
)
def test_a_chat_continues_the_cache_of_a_method_before_the_llm(method, options, lvlm, images):
    """They cut layer 0 too: on a SequenceCache a later turn goes on from the dialogue's length,
    as the model's own forward on a copy of that cache answers with each new token at its place
    (renumbered: less the shift the pruned prefills left)."""
    from test_chat import play
    from tiny_models import pruned_by

    from asapcli.engine import PruningPlan, cache_state, make_method
    from asapcli.engine.settings import PruneSettings
    from asapcli.runtime.chat import ChatSession

    session = ChatSession(lvlm, PruneSettings(method, k=K, **options), max_tokens=3)
    play(session, images, [("image", 0), ("ask", "what is it?"), ("ask", "sure?"), ("image", 1), ("ask", "and this?")])
    assert session.cache.get_seq_length() == len(session.seen) > session.cache.layers[0].get_seq_length()
    ids = build_inputs(lvlm.processor, session.messages + [user_message("one more?", 0)], session.images)["input_ids"]
    cached = session._reuse_cache(ids[0].tolist())
    reference = cut_by_hand(session.cache, 0, [])
    shift = cache_state.of(session.cache).shift_at(0)
    positions = torch.arange(cached, ids.shape[1])[None] - (0 if shift is None else shift[:, None])
    with torch.inference_mode(), pruned_by(lvlm.model, PruningPlan(make_method(method), K, 0, spans=[])):
        chat_logits = lvlm.model(input_ids=ids[:, cached:], past_key_values=session.cache, use_cache=True).logits
    with torch.inference_mode():
        own = lvlm.model(input_ids=ids[:, cached:], past_key_values=reference, position_ids=positions).logits
    assert torch.allclose(chat_logits, own, atol=1e-5)
