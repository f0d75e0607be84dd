"""The pruned decoder inside real (tiny) transformers LVLMs, against transformers' own forward
and generate(), and the shape of the KV cache it leaves behind."""

from pathlib import Path

import pytest
import torch
from tiny_models import pruned_by
from transformers import AutoModelForImageTextToText, DynamicCache

from asapcli.engine import METHODS, cache_state, image_spans
from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.errors import UnsupportedModel, UsageError
from asapcli.runtime.generation import generate
from asapcli.runtime.inputs import build_inputs, load_image, user_message
from asapcli.runtime.loading import load

FAMILIES = ["llava", "llava-next"]
CAR = Path(__file__).parent.parent / "examples" / "car.png"


@pytest.fixture(scope="module")
def loaded(model_paths):
    return {name: load(str(path), device="cpu") for name, path in model_paths.items()}


@pytest.fixture(scope="module")
def reference(model_paths):
    return {name: AutoModelForImageTextToText.from_pretrained(path).eval() for name, path in model_paths.items()}


def two_image_inputs(lvlm, images):
    return build_inputs(lvlm.processor, [user_message("what is where?", 2)], images)


def logits(lvlm, inputs, pruning=None, cache=None):
    return pruned_logits(lvlm, inputs, pruning, cache)[0]


def pruned_logits(lvlm, inputs, pruning=None, cache=None):
    """The logits of one forward call pruned by the plan `pruning` made by hand, and what its
    prefill did (None where it brought no image)."""
    with torch.inference_mode(), pruned_by(lvlm.model, pruning) as session:
        out = lvlm.model(**inputs, past_key_values=cache, use_cache=cache is not None).logits
    return out, (session.prefills[0] if session.prefills else None)


def test_image_spans_are_the_runs_of_image_tokens():
    ids = torch.tensor([1, 9, 9, 9, 2, 3, 9, 9, 4, 9])
    assert image_spans(ids, 9) == [(1, 4), (6, 8), (9, 10)]
    assert image_spans(torch.tensor([1, 2]), 9) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_matches_transformers_forward_and_generate(family, loaded, reference, images):
    lvlm, ref = loaded[family], reference[family]
    inputs = two_image_inputs(lvlm, images)
    pruning = plan_for(lvlm, inputs["input_ids"][0], PruneSettings(method="vanilla"))
    with torch.inference_mode():
        expected = ref(**inputs).logits
        expected_tokens = ref.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.allclose(logits(lvlm, inputs, pruning), expected, atol=1e-5)
    result = generate(lvlm, inputs, PruneSettings(method="vanilla"), max_tokens=12)
    assert result.generated_tokens == expected_tokens.shape[1] - inputs["input_ids"].shape[1]
    assert (
        result.text
        == lvlm.processor.tokenizer.decode(
            expected_tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
    )


@pytest.fixture(scope="module")
def demo():
    """The bundled demo model (trained: its attention logits are large enough that any leak
    through SG-BiMask shows) and transformers' own copy of it, on the example image."""
    lvlm = load("demo", device="cpu")
    reference = AutoModelForImageTextToText.from_pretrained(lvlm.preset.bundled_path()).eval()
    inputs = build_inputs(lvlm.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    return lvlm, reference, inputs


@pytest.mark.parametrize("method", list(METHODS))
def test_a_budget_at_or_above_the_image_is_vanilla_bit_for_bit(method, demo):
    """Nothing to prune means nothing changed: no SG-BiMask in layers 0..L-1 either (its ln(eps)
    floor alone moves the demo model's logits by about 1.5, whatever lambda_max)."""
    lvlm, reference, inputs = demo
    with torch.inference_mode():
        expected = reference(**inputs).logits
        expected_tokens = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    for k, lambda_max in [(576, 1.0), (10_000, 1e-12)]:
        settings = PruneSettings(method=method, k=k, lambda_max=lambda_max if method.startswith("asap") else None)
        pruning = plan_for(lvlm, inputs["input_ids"][0], settings)
        out, done = pruned_logits(lvlm, inputs, pruning)
        assert torch.equal(out, expected)
        with torch.inference_mode(), pruned_by(lvlm.model, pruning) as session:
            assert torch.equal(lvlm.model.generate(**inputs, max_new_tokens=6, do_sample=False), expected_tokens)
        assert done.records == session.prefills[0].records == ((),)  # nothing kept, nothing scored


def test_only_the_spans_a_budget_shrinks_get_sg_bimask(loaded, images):
    """LLaVA-NeXT tiles two images into different token counts: at a k between them, the smaller
    image runs as vanilla to the bit in the layers before L, the larger is changed by SG-BiMask
    there and pruned."""
    lvlm = loaded["llava-next"]
    inputs = two_image_inputs(lvlm, images)
    ids = inputs["input_ids"][0]
    small, large = sorted(image_spans(ids, lvlm.image_token_id), key=lambda span: span[1] - span[0])
    assert small[1] - small[0] < large[1] - large[0]
    pruning = plan_for(lvlm, ids, PruneSettings(method="asap", k=small[1] - small[0], layer=2))
    cache, plain = (DynamicCache(config=lvlm.model.config.get_text_config()) for _ in range(2))
    _, done = pruned_logits(lvlm, inputs, pruning, cache)
    logits(lvlm, inputs, None, plain)
    keys, plain_keys = cache.layers[1].keys, plain.layers[1].keys  # computed from layer 0's output
    assert torch.equal(keys[:, :, small[0] : small[1]], plain_keys[:, :, small[0] : small[1]])
    assert not torch.allclose(keys[:, :, large[0] : large[1]], plain_keys[:, :, large[0] : large[1]], atol=1e-4)
    assert [len(record.kept) for record in done.pruned()] == [small[1] - small[0]]


def test_sg_bimask_changes_the_forward_pass_of_layers_before_l(loaded, images):
    """SG-BiMask is part of the forward pass (paper C.1), not only of the scoring: the image's
    states in layers 0..L-1 differ from FastV's causal ones; the text before it does not."""
    lvlm = loaded["llava"]
    inputs = two_image_inputs(lvlm, images)
    ids = inputs["input_ids"][0]
    first = image_spans(ids, lvlm.image_token_id)[0]
    caches = {}
    for method in ("fastv", "asap-bimask-only"):
        caches[method] = DynamicCache(config=lvlm.model.config.get_text_config())
        logits(lvlm, inputs, plan_for(lvlm, ids, PruneSettings(method=method, k=8, layer=3)), caches[method])
    for layer in (1, 2):  # inputs computed by layers 0 and 1, both before L = 3
        causal, soft = caches["fastv"].layers[layer].values, caches["asap-bimask-only"].layers[layer].values
        assert torch.equal(causal[:, :, : first[0]], soft[:, :, : first[0]])
        assert not torch.allclose(causal[:, :, first[0] : first[1]], soft[:, :, first[0] : first[1]], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "random", "asap", "asap-bimask-only"])
def test_layers_from_l_on_hold_text_plus_k_per_image(family, method, loaded, images):
    lvlm, k, layer = loaded[family], 8, 2
    inputs = two_image_inputs(lvlm, images)
    ids = inputs["input_ids"][0]
    spans = image_spans(ids, lvlm.image_token_id)
    assert len(spans) == 2
    visual = sum(end - start for start, end in spans)
    pruning = plan_for(lvlm, ids, PruneSettings(method=method, k=k, layer=layer))
    cache = DynamicCache(config=lvlm.model.config.get_text_config())
    out, done = pruned_logits(lvlm, inputs, pruning, cache)
    total, text = ids.numel(), ids.numel() - visual
    lengths = [cache.get_seq_length(i) for i in range(lvlm.num_layers)]
    assert lengths == [total] * layer + [text + 2 * k] * (lvlm.num_layers - layer)
    assert out.shape[1] == text + 2 * k
    # Every kept position lies inside its own span; k per span.
    assert [len(record.kept) for record in done.pruned()] == [k, k]
    for kept, (start, end) in zip((record.kept for record in done.pruned()), spans):
        assert kept.min() >= start and kept.max() < end and torch.equal(kept, kept.sort().values)


@pytest.mark.parametrize("method", ["fastv", "asap"])
def test_decoding_after_pruning_runs_and_reports(method, loaded, images):
    lvlm = loaded["llava"]
    inputs = two_image_inputs(lvlm, images)
    result = generate(lvlm, inputs, PruneSettings(method=method, k=8, layer=2), max_tokens=10)
    assert result.generated_tokens >= 1
    assert (result.visual_tokens, result.kept_tokens) == (128, 16)
    assert result.flops_ratio < 0.6


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_a_pruned_prefill_of_the_same_tokens(family, loaded, images):
    """Random selection does not depend on the query rows, so the from-scratch prefill keeps
    the same tokens as the prefill whose cache the decoding steps extend."""
    lvlm = loaded[family]
    inputs = two_image_inputs(lvlm, images)
    ids = inputs["input_ids"][0]
    settings = PruneSettings(method="random", k=8, layer=2, seed=3)
    with torch.inference_mode(), pruned_by(lvlm.model, plan_for(lvlm, ids, settings)):
        generated = lvlm.model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    sequence = generated.sequences
    assert sequence.shape[1] == ids.numel() + 6
    whole = dict(inputs, input_ids=sequence, attention_mask=torch.ones_like(sequence))
    scratch = logits(lvlm, whole, plan_for(lvlm, sequence[0], settings))
    n_text_after = 6
    for step in range(1, n_text_after):
        # logits of decoding step `step` came from the token at sequence position prompt+step-1
        assert torch.allclose(generated.logits[step][0], scratch[0, -(n_text_after - step) - 1], atol=1e-4)


def test_a_plan_ignores_spans_already_in_the_cache(loaded, images):
    """A later chat turn: the image is in the cache already, only new text is prefilled."""
    lvlm = loaded["llava"]
    first = build_inputs(lvlm.processor, [user_message("hi", 1)], images[:1])
    settings = PruneSettings(method="asap", k=8, layer=2)
    cache = DynamicCache(config=lvlm.model.config.get_text_config())
    logits(lvlm, first, plan_for(lvlm, first["input_ids"][0], settings), cache)
    before = [cache.get_seq_length(i) for i in range(lvlm.num_layers)]
    more = lvlm.processor.tokenizer(" more", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([first["input_ids"], more], dim=1)
    second_plan = plan_for(lvlm, ids[0], settings)  # names the old span; nothing in this chunk
    with torch.inference_mode(), pruned_by(lvlm.model, second_plan) as session:
        lvlm.model(input_ids=more, past_key_values=cache, use_cache=True)
    after = [cache.get_seq_length(i) for i in range(lvlm.num_layers)]
    assert [a - b for a, b in zip(after, before)] == [more.shape[1]] * lvlm.num_layers
    assert session.prefills[0].records == ((),)


def test_bimask_only_is_asap_without_consolidation(loaded, images):
    lvlm = loaded["llava"]
    inputs = two_image_inputs(lvlm, images)
    ids = inputs["input_ids"][0]
    kept = {}
    for name, settings in {
        "bimask-only": PruneSettings(method="asap-bimask-only", k=8),
        "asap, nothing merged": PruneSettings(method="asap", k=8, merge_threshold=1.0),
        "asap": PruneSettings(method="asap", k=8, merge_threshold=-1.0),  # everything merges
    }.items():
        _, done = pruned_logits(lvlm, inputs, plan_for(lvlm, ids, settings))
        kept[name] = torch.cat([record.kept for record in done.pruned()])
    assert torch.equal(kept["bimask-only"], kept["asap, nothing merged"])
    assert not torch.equal(kept["bimask-only"], kept["asap"])  # refilled from the pruned pool


@pytest.mark.parametrize("method", ["fastv", "asap"])
def test_contribution_score_ranks_by_attention_times_value_norm(method, loaded, images):
    lvlm = loaded["llava"]
    inputs = two_image_inputs(lvlm, images)
    ids = inputs["input_ids"][0]
    importance = {}
    for score in ("attention", "contribution"):
        _, done = pruned_logits(lvlm, inputs, plan_for(lvlm, ids, PruneSettings(method=method, k=8, score=score)))
        importance[score] = torch.cat([record.importance for record in done.records[0]])
        assert [len(record.kept) for record in done.pruned()] == [8, 8]
    assert not torch.allclose(importance["attention"], importance["contribution"])


def test_unknown_score_is_a_usage_error():
    with pytest.raises(UsageError, match="score must be one of attention, contribution"):
        PruneSettings(method="fastv", score="magic")


@pytest.mark.parametrize("method, kept_per_image", [("divprune", 8), ("pool", 4)])  # pool: 2 x 2 <= 8 cells
def test_methods_before_the_llm_prune_every_layer(method, kept_per_image, loaded, images):
    lvlm = loaded["llava"]
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    ids = inputs["input_ids"][0]
    pruning = plan_for(lvlm, ids, PruneSettings(method=method, k=8, layer=2))
    assert pruning.layer == 0  # whatever --layer said
    cache = DynamicCache(config=lvlm.model.config.get_text_config())
    logits(lvlm, inputs, pruning, cache)
    text = ids.numel() - 64
    assert [cache.get_seq_length(i) for i in range(lvlm.num_layers)] == [text + kept_per_image] * lvlm.num_layers
    result = generate(lvlm, inputs, PruneSettings(method=method, k=8), max_tokens=4)
    assert (result.visual_tokens, result.kept_tokens) == (64, kept_per_image)

    def per_layer(v, d=64, m=128):  # Eq. 7's layer term on the tiny model
        return 4 * v * d * d + 2 * v * v * d + 3 * v * d * m

    assert result.flops_ratio == pytest.approx(per_layer(kept_per_image) / per_layer(64))  # every layer pruned


def test_divprune_equals_the_model_fed_only_the_kept_features(loaded, images):
    """Pruning before the LLM with original positions is the plain model run on the shorter
    sequence of embeddings at those positions."""
    lvlm = loaded["llava"]
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    ids = inputs["input_ids"][0]
    pruning = plan_for(lvlm, ids, PruneSettings(method="divprune", k=8))
    pruned, done = pruned_logits(lvlm, inputs, pruning)
    model = lvlm.model
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        embeds[inputs["input_ids"] == lvlm.image_token_id] = features.reshape(-1, embeds.shape[-1])
        start, end = image_spans(ids, lvlm.image_token_id)[0]
        keep = torch.cat([torch.arange(start), done.pruned()[0].kept, torch.arange(end, ids.numel())])
        reference = model(inputs_embeds=embeds[:, keep], position_ids=keep[None]).logits
    assert torch.allclose(pruned, reference, atol=1e-5)


def test_timings_say_what_they_include(model_paths, images, monkeypatch):
    lvlm = load(str(model_paths["llava"]), device="cpu")  # a fresh load: no generation yet
    synchronized = []
    monkeypatch.setattr("asapcli.runtime.streaming.synchronize", synchronized.append)
    monkeypatch.setattr(lvlm.model.generation_config, "eos_token_id", None)  # answers run to max_tokens
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    settings = PruneSettings(method="asap", k=8)
    first = generate(lvlm, inputs, settings, max_tokens=3)
    # The device is synchronised before the clock starts, at the first token, and at the end.
    assert synchronized == [lvlm.device] * 3
    second = generate(lvlm, inputs, settings, max_tokens=12)
    assert (first.cold, second.cold) == (True, False)
    assert first.decode_tokens_per_second is None  # 2 decoded tokens
    assert second.generated_tokens == 12 and second.decode_tokens_per_second > 0


@pytest.mark.parametrize("family", [*FAMILIES, "demo"])
def test_renumbered_divprune_is_the_model_fed_only_the_kept_features(family, loaded, reference, demo, images):
    """Official DivPrune's pipeline: the kept features go into the model as a shorter prompt, so
    positions run 0..M-1 and decoding goes on from M. transformers' own forward and generate()
    on those embeddings are the reference, step by step."""
    if family == "demo":
        lvlm, ref, inputs = demo
    else:
        lvlm, ref = loaded[family], reference[family]
        inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    ids = inputs["input_ids"][0]
    settings = PruneSettings(method="divprune", k=8, positions="renumber")
    with torch.inference_mode():
        embeds = ref.get_input_embeddings()(inputs["input_ids"])
        image_inputs = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        features = torch.cat(ref.model.get_image_features(**image_inputs).pooler_output)
        embeds[inputs["input_ids"] == lvlm.image_token_id] = features.reshape(-1, embeds.shape[-1])
        pruning = plan_for(lvlm, ids, settings)
        with pruned_by(lvlm.model, pruning) as session:
            steps = lvlm.model.generate(
                **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        start, end = image_spans(ids, lvlm.image_token_id)[0]
        keep = torch.cat([torch.arange(start), session.prefills[0].pruned()[0].kept, torch.arange(end, ids.numel())])
        expected = ref.generate(
            inputs_embeds=embeds[:, keep], max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    assert torch.equal(steps.sequences[0, ids.numel() :], expected.sequences[0])
    for step, expected_logits in zip(steps.logits, expected.logits, strict=True):
        assert torch.allclose(step, expected_logits, atol=1e-4)


def test_renumbering_is_for_methods_that_prune_before_the_llm():
    PruneSettings(method="pool", positions="renumber")
    with pytest.raises(UsageError, match="--positions renumber is for methods that shorten the sequence they feed on"):
        PruneSettings(method="fastv", positions="renumber")
    with pytest.raises(UsageError, match="positions must be one of original, renumber"):
        PruneSettings(method="divprune", positions="shuffled")


@pytest.mark.parametrize(
    "queries, layer, same", [("last", 1, True), ("text", 1, True), ("all", 1, False), ("last", 2, False)]
)
def test_sg_bimask_reaches_a_text_query_selection_only_through_earlier_layers(queries, layer, same, demo):
    """Text rows are causal under either mask: at L = 1 (scored in layer 0, whose inputs no mask
    has touched) SG-BiMask selects exactly as FastV does; image rows ('all') or L = 2 differ."""
    lvlm, _, inputs = demo
    chosen = {}
    for method in ("fastv", "asap-bimask-only"):
        pruning = plan_for(
            lvlm, inputs["input_ids"][0], PruneSettings(method, k=128, layer=layer, score_queries=queries)
        )
        _, done = pruned_logits(lvlm, inputs, pruning)
        chosen[method] = done.pruned()[0].kept, done.pruned()[0].importance
    (fastv_kept, fastv_importance), (bimask_kept, bimask_importance) = chosen.values()
    assert torch.equal(fastv_kept, bimask_kept) == same
    assert torch.equal(fastv_importance, bimask_importance) == same


def test_a_layer_that_does_not_hand_on_the_pass_fails_loudly(llava_path, images, monkeypatch):
    """The pass reaches the attention function through transformers' keyword passthrough: a
    transformers that stops handing it on must fail, not prune by plain SDPA's scores."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    layer = lvlm.decoder.decoder.layers[1]  # L = 2: layer 1 scores the span
    forward = layer.forward
    monkeypatch.setattr(layer, "forward", lambda *args, prune_pass=None, **kwargs: forward(*args, **kwargs))
    plan = plan_for(lvlm, inputs["input_ids"][0], PruneSettings(method="fastv", k=8, layer=2))
    with pytest.raises(UnsupportedModel, match="did not hand the pruning pass to its attention function \\(layer 1\\)"):
        pruned_logits(lvlm, inputs, plan)
    assert logits(lvlm, inputs).shape[1] == inputs["input_ids"].shape[1]  # no pass: the layer is not asked


def test_the_pruning_state_travels_with_its_cache(llava_path, images):
    """What a prefill leaves for later calls lives on its cache: a second sequence on another cache
    starts from none and leaves the first's as it was."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    plan = plan_for(lvlm, inputs["input_ids"][0], PruneSettings(method="divprune", k=8, positions="renumber"))
    first, second = (DynamicCache(config=lvlm.model.config.get_text_config()) for _ in range(2))
    pruned_logits(lvlm, inputs, plan, first)
    shifts = dict(cache_state.of(first).shift)
    assert shifts  # renumbered: later calls need the shift
    logits(lvlm, inputs, None, second)
    assert cache_state.of(second).shift == {} and cache_state.of(first).shift == shifts


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_a_cache_emptied_for_a_new_sequence_carries_no_pruning_state(positions, llava_path, images):
    """A cache reset for another prompt holds no pruned layers: the renumbering a pruned prefill
    left on it, or the tokens it cut from layer 0, must not shift the new sequence's positions
    (renumbered, the two cancel out: with original positions the count alone would)."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    plan = plan_for(lvlm, inputs["input_ids"][0], PruneSettings(method="divprune", k=8, positions=positions))
    cache = DynamicCache(config=lvlm.model.config.get_text_config())
    pruned_logits(lvlm, inputs, plan, cache)
    cache.reset()
    fresh = DynamicCache(config=lvlm.model.config.get_text_config())
    assert torch.equal(logits(lvlm, inputs, None, cache), logits(lvlm, inputs, None, fresh))
