"""PyramidDrop (`--method pdrop`) and the multi-stage pruning it drives in the engine.

Covers: the kept set of every stage equal to `reference_baselines.pyramiddrop_rank` fed with the
hidden states entering the stage's layer, that layer's weights and the current positions (the demo
model and the tiny LLaVA-NeXT, both --positions); first-token logits and 5 greedy tokens equal to
the official pipeline re-expressed here on transformers' layers (drop at each stage, renumber,
decode positions shifted per stage as modeling_llama_pdrop.py 1259-1268 does); nothing pruned is
vanilla bit for bit; the KV cache's lengths per stage, a padded batch equal to its rows one by one,
a chat's later turn pruning its own image only; the API block's report per stage and Eq. 7 of the
same schedule; the CLI (run, flops, profile, a bad option); the budget-matched lambda."""

import json
from pathlib import Path

import pytest
import reference_baselines as ref
import torch
from tiny_models import pruned_by
from transformers import DynamicCache

import asapcli
from asapcli.engine.methods import SpanView
from asapcli.engine.methods.pdrop import PyramidDrop, matched_ratio, mean_tokens
from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.chat import ChatSession
from asapcli.runtime.inputs import build_inputs, user_message
from asapcli.runtime.loading import load

REPO = Path(__file__).resolve().parents[1]
QUESTION = "what colour is the car?"
STEPS = 5


@pytest.fixture(scope="module")
def demo():
    return load("demo", device="cpu")


@pytest.fixture(scope="module")
def car():
    from PIL import Image

    return Image.open(REPO / "examples" / "car.png").convert("RGB")


def _text(lvlm):
    return lvlm.decoder.decoder  # the language model the pruned decoder drives


def _inputs(lvlm, images, question=QUESTION):
    return build_inputs(lvlm.processor, [user_message(question, len(images))], images)


def _reference_stages(lvlm, inputs, image, layer_inputs, renumber):
    """Each stage's kept positions (original numbering) by the reference ranking, fed what entered
    that stage's layer in the pruned run."""
    text = _text(lvlm)
    config = text.config
    positions = list(range(inputs["input_ids"].shape[1]))
    start, length, answers = image.start, image.end - image.start, []
    for layer, kept in image.stages:
        hidden = layer_inputs[layer][0]
        block = text.layers[layer]
        cos, sin = text.rotary_emb(hidden[None], torch.arange(len(positions) + image.end)[None])
        current = torch.arange(hidden.shape[0]) if renumber else torch.tensor(positions)
        attention = block.self_attn
        top = ref.pyramiddrop_rank(
            hidden, image_start=start, image_len=length, keep=len(kept), norm_weight=block.input_layernorm.weight,
            norm_eps=block.input_layernorm.variance_epsilon, wq=attention.q_proj.weight, wk=attention.k_proj.weight,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, cos=cos[0], sin=sin[0],
            position_ids=current, repeat_kv=True,
        )  # fmt: skip
        chosen = [positions[p] for p in top.tolist()]
        answers.append((layer, chosen))
        positions = positions[:start] + chosen + positions[start + length :]
        length = len(kept)
    return answers


def _capture_layer_inputs(lvlm):
    """Hooks that keep, for every layer, the hidden states its predecessor handed on (what a
    stage before it ranks); layer 0 gets the embeddings."""
    seen, hooks = {}, []
    layers = _text(lvlm).layers
    for index, layer in enumerate(layers):
        if index + 1 < len(layers):
            hooks.append(layer.register_forward_hook(lambda m, a, out, i=index: seen.setdefault(i + 1, out.detach())))
    hooks.append(layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault(0, args[0].detach())))
    return seen, hooks


@pytest.mark.parametrize("positions", ["original", "renumber"])
@pytest.mark.parametrize("family", ["demo", "llava-next"])
def test_every_stage_keeps_the_reference_set(family, positions, demo, car, llava_next_path, images):
    lvlm = demo if family == "demo" else load(str(llava_next_path), device="cpu")
    pictures = [car] if family == "demo" else images[:1]
    options = {"k": 200} if family == "demo" else {"k": 1, "stage_ratio": "0.5"}
    inputs = _inputs(lvlm, pictures)
    seen, hooks = _capture_layer_inputs(lvlm)
    try:
        with torch.inference_mode(), asapcli.pruned(lvlm.model, method="pdrop", positions=positions, **options) as p:
            lvlm.model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    (image,) = p.report().images
    steps = PyramidDrop(**({"stage_ratio": "0.5"} if "stage_ratio" in options else {})).schedule(
        image.end - image.start, options["k"], 2, lvlm.num_layers
    )
    assert [(layer, len(kept)) for layer, kept in image.stages] == steps and len(steps) == 3
    assert _reference_stages(lvlm, inputs, image, seen, positions == "renumber") == image.stages
    for (_, before), (_, after) in zip(image.stages, image.stages[1:]):
        assert set(after) < set(before)  # each stage prunes what the one before left
    assert image.kept == image.stages[-1][1]


def _official(lvlm, inputs, span, steps, tokens=STEPS):
    """The authors' pipeline on transformers' own layers: the tokens are dropped before each stage
    layer by the reference ranking and numbered 0..M-1 afresh; a decoding step takes, in each
    layer, the position its cache length says (the authors' per-stage shift). Returns every
    step's logits and the greedy tokens."""
    text, model = _text(lvlm), lvlm.model
    embeds, hooks = _capture_layer_inputs(lvlm)
    try:
        with torch.inference_mode():
            model(**inputs)  # no block: vanilla, for the embeddings the language model receives
    finally:
        for hook in hooks:
            hook.remove()
    hidden, cache, config = embeds[0], DynamicCache(config=text.config), text.config
    start, length, stage = span[0], span[1] - span[0], dict(steps)
    logits, new = [], []
    eos = torch.tensor(lvlm.model.generation_config.eos_token_id).view(-1)
    with torch.inference_mode():
        for step in range(tokens):
            for index, layer in enumerate(text.layers):
                if step == 0 and index in stage:
                    cos, sin = text.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
                    block, attention = layer, layer.self_attn
                    top = ref.pyramiddrop_rank(
                        hidden[0], image_start=start, image_len=length, keep=stage[index],
                        norm_weight=block.input_layernorm.weight, norm_eps=block.input_layernorm.variance_epsilon,
                        wq=attention.q_proj.weight, wk=attention.k_proj.weight, num_heads=config.num_attention_heads,
                        num_kv_heads=config.num_key_value_heads, cos=cos[0], sin=sin[0], repeat_kv=True,
                    )  # fmt: skip
                    order = torch.cat([torch.arange(start), top, torch.arange(start + length, hidden.shape[1])])
                    hidden, length = hidden[:, order], stage[index]
                first = cache.get_seq_length(index)
                positions = torch.arange(first, first + hidden.shape[1])[None]
                embeddings = text.rotary_emb(hidden, positions)
                hidden = layer(hidden, position_embeddings=embeddings, position_ids=positions, past_key_values=cache)
            scores = model.lm_head(text.norm(hidden))[:, -1]
            logits.append(scores[0])
            new.append(int(scores[0].index_fill(0, eos, float("-inf")).argmax()))  # as min_new_tokens does
            hidden = text.embed_tokens(torch.tensor([[new[-1]]]))
    return logits, new


def _greedy(model, inputs, **generate):
    return model.generate(
        **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **generate,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["demo", "llava-next"])
def test_logits_and_greedy_tokens_equal_the_official_pipeline(family, demo, car, llava_next_path, images):
    if family == "llava-next":  # tiles and newlines in one span, the authors' own ratio 0.5
        demo, car, options = load(str(llava_next_path), device="cpu"), images[0], {"k": 1, "stage_ratio": "0.5"}
    else:
        options = {"k": 200}
    inputs = _inputs(demo, [car])
    with torch.inference_mode(), asapcli.pruned(demo.model, method="pdrop", positions="renumber", **options) as p:
        out = _greedy(demo.model, inputs)
    (image,) = p.report().images
    steps = [(layer, len(kept)) for layer, kept in image.stages]
    logits, tokens = _official(demo, inputs, (image.start, image.end), steps)
    length = inputs["input_ids"].shape[1]
    assert out.sequences[0, length:].tolist() == tokens
    for step in range(STEPS):  # the decoding steps too: each stage's layers continue its own numbering
        gap = float((out.logits[step][0] - logits[step]).abs().max())
        assert torch.allclose(out.logits[step][0], logits[step], atol=1e-5), (step, gap)


def test_nothing_pruned_is_vanilla_bit_for_bit(demo, car):
    inputs = _inputs(demo, [car])
    with torch.inference_mode():
        vanilla = _greedy(demo.model, inputs)
        with asapcli.pruned(demo.model, method="pdrop", k=576) as p:
            same = _greedy(demo.model, inputs)
    assert p.report().images[0].kept is None and p.report().flops_ratio == 1.0
    assert torch.equal(vanilla.sequences, same.sequences)
    assert all(torch.equal(a, b) for a, b in zip(vanilla.logits, same.logits, strict=True))


def test_the_cache_holds_each_stage_and_the_report_counts_the_schedule(demo, car):
    inputs = _inputs(demo, [car])
    with torch.inference_mode(), asapcli.pruned(demo.model, method="pdrop", k=200) as p:
        out = _greedy(demo.model, inputs)
    report = p.report()
    (image,) = report.images
    n, full = image.end - image.start, inputs["input_ids"].shape[1] + STEPS - 1
    counts = dict(PyramidDrop().schedule(n, 200, 2, 4))
    lengths = [layer.get_seq_length() for layer in out.past_key_values.layers]
    assert lengths == [full, full - n + counts[1], full - n + counts[2], full - n + counts[3]]
    assert (report.layer, report.visual_tokens, report.kept_tokens) == (1, n, counts[3])
    expected = asapcli.engine.cost.visual_flops(demo.model.config.get_text_config(), n, sorted(counts.items()))
    assert report.flops_ratio == pytest.approx(expected.ratio)
    # Eq. 7 of the same schedule: 1 layer with all 576, then one with each stage's count.
    assert report.flops_ratio < 1


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_a_padded_batch_equals_its_rows_one_by_one(positions, llava_next_path, images):
    """LLaVA-NeXT tiles the two images differently: the rows keep different counts at every stage."""
    lvlm = load(str(llava_next_path), device="cpu")
    processor = lvlm.processor
    prompts = ["what is it?", "where is the blue thing in this picture?"]
    texts = [processor.apply_chat_template([user_message(q, 1)], add_generation_prompt=True) for q in prompts]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    settings = PruneSettings(method="pdrop", k=1, positions=positions, stage_ratio="0.5")
    plans = [plan_for(lvlm, row, settings) for row in batch["input_ids"]]
    with torch.inference_mode(), pruned_by(lvlm.model, plans) as session:
        batched = _greedy(lvlm.model, batch)
    done = session.prefills[0]
    counts = [[len(kept) for _, kept in done.pruned(row)[0].stages] for row in range(len(plans))]
    assert counts[0] != counts[1] and (batch["attention_mask"] == 0).any()
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        single = processor(text=text, images=[image], return_tensors="pt")
        plan = plan_for(lvlm, single["input_ids"][0], settings)
        with torch.inference_mode(), pruned_by(lvlm.model, plan) as session:
            alone = _greedy(lvlm.model, single)
        length = single["input_ids"].shape[1]
        assert torch.equal(batched.sequences[row, -STEPS:], alone.sequences[0, length:])
        for step in range(STEPS):
            assert torch.allclose(batched.logits[step][row], alone.logits[step][0], atol=1e-5)
        padding = batch["input_ids"].shape[1] - length
        mine = [(layer, kept.tolist()) for layer, kept in session.prefills[0].pruned()[0].stages]
        theirs = [(layer, (kept - padding).tolist()) for layer, kept in done.pruned(row)[0].stages]
        assert mine == theirs


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_a_later_turn_prunes_its_own_image_by_the_schedule(positions, llava_path, images):
    lvlm = load(str(llava_path), device="cpu")
    session = ChatSession(lvlm, PruneSettings(method="pdrop", k=32, positions=positions), max_tokens=4)
    session.add_image("first", images[0])
    first = session.ask("what is it?")
    before = [layer.keys.clone() for layer in session.cache.layers]
    seen_one = list(session.seen)
    session.add_image("second", images[1])
    second = session.ask("and this one?")
    steps = PyramidDrop().schedule(64, 32, 2, 4)
    assert len(steps) == 3
    for turn in (first, second):
        (span,) = turn.result.pruning.spans
        assert [(layer, len(kept)) for layer, kept in span.stages] == steps
        assert turn.result.steps == steps
    lengths = [layer.get_seq_length() for layer in session.cache.layers]
    total = len(session.seen)
    assert lengths == [total] + [total - 2 * (64 - count) for _, count in steps]
    ids_two = session.seen[: second.result.prompt_tokens]
    common = next(i for i, (a, b) in enumerate(zip([*seen_one, None], ids_two)) if a != b)
    assert common >= first.result.prompt_tokens  # turn 1's prompt, image included, stays cached
    for keys, layer in zip(before, session.cache.layers, strict=True):
        shared = keys.shape[2] - (len(seen_one) - common)  # less what the template renders anew
        assert torch.equal(layer.keys[:, :, :shared], keys[:, :, :shared])  # turn 1's entries untouched


def test_budget_matched_lambda():
    ratio, layers = matched_ratio(576, 192, 32)
    assert layers == [8, 16, 24] and mean_tokens(576, ratio, layers, 32) == pytest.approx(192)
    steps = PyramidDrop().schedule(576, 192, 2, 32)
    # 144 (1 + l + l^2 + l^3) = 192 at l = 0.2531: 576 l^s rounded down
    assert steps == [(8, 145), (16, 36), (24, 9)] and ratio == pytest.approx(0.25308, abs=1e-5)
    assert sum((b - a) * c for (a, c), (b, _) in zip([(0, 576), *steps], [*steps, (32, 0)])) / 32 <= 192
    assert PyramidDrop(stage_ratio="0.5").schedule(576, 64, 2, 32) == [(8, 288), (16, 144), (24, 72)]
    ratio, layers = matched_ratio(576, 64, 32)  # 8/16/24 average 144 at least: the stages move up
    assert layers[0] < 8 and mean_tokens(576, ratio, layers, 32) == pytest.approx(64)
    assert PyramidDrop().schedule(576, 576, 2, 32) == []
    assert PyramidDrop().stage_layers(2, 40) == [10, 20, 30]


def test_ties_go_as_torch_topk_breaks_them():
    """All scores equal: the kept set is torch.topk's (the authors' call), not the lowest indices."""
    importance = torch.full((40,), 0.2)
    span = SpanView(start=0, hidden=torch.randn(40, 4), importance=importance)
    kept = PyramidDrop().select(span, 3).kept
    assert kept.tolist() == sorted(ref._topk_indices(importance, 3, tie_break="torch").tolist())
    assert kept.tolist() != [0, 1, 2]


def test_run_flops_and_profile_through_the_cli(asap):
    run = asap(
        "run", REPO / "examples" / "car.png", QUESTION, "--method", "pdrop", "-k", 64, "--json", "--max-tokens", 4
    )
    assert run.exit_code == 0, run.output
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["method"] == "pdrop"
    flops = asap("flops", "-m", "llava-1.5-7b", "--method", "pdrop", "-k", 128, "--json")
    assert flops.exit_code == 0, flops.output
    counted = json.loads(flops.stdout)
    steps = PyramidDrop().schedule(576, 128, 2, 32)
    assert [stage["tokens"] for stage in counted["stages"]] == [576] + [count for _, count in steps]
    profile = asap("profile", "-m", "bench", "--methods", "vanilla,pdrop", "-k", 128, "--repeats", 1, "--warmup", 0,
                   "--decode-tokens", 2, "--json")  # fmt: skip
    assert profile.exit_code == 0, profile.output


def test_a_bad_option_is_one_error_line(asap):
    result = asap("run", REPO / "examples" / "car.png", QUESTION, "--method", "pdrop", "--stage-ratio", "2")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: stage-ratio must be budget or a number in (0, 1), got '2'"


def test_each_stage_keeps_its_share_of_the_span_not_of_the_stage_before(asap):
    """Stage s keeps int(N lambda^s), as the authors' int(n * ratio) of the whole span: rounding each
    stage's count from the one before loses tokens (-k 25 on LLaVA-1.5-7B: 104/19/3, not 104/18/3)."""
    result = asap("flops", "-m", "llava-1.5-7b", "--method", "pdrop", "-k", 25, "--json")
    assert result.exit_code == 0, result.output
    ratio, _ = matched_ratio(576, 25, 32)
    tokens = [stage["tokens"] for stage in json.loads(result.stdout)["stages"]]
    assert tokens == [576] + [int(576 * ratio**stage) for stage in (1, 2, 3)] == [576, 104, 19, 3]


def test_an_image_in_a_later_turn_is_scored_at_its_own_place_in_the_cache(llava_path, images):
    """The stages' attention read after the cached turns: the image of turn 2 keeps what one
    prefill of the whole dialogue keeps (turn 1 had no image, so its cache is what that prefill
    computes); read without the offset, a chat kept token 258 where 252 was right."""
    lvlm = load(str(llava_path), device="cpu")
    session = ChatSession(lvlm, PruneSettings(method="pdrop", k=32), max_tokens=4)
    session.ask("hello there, how are you?")
    session.add_image("picture", images[1])
    second = session.ask("what is it?")
    (span,) = second.result.pruning.spans
    ids = torch.tensor([session.seen[: second.result.prompt_tokens]])
    pixels = lvlm.processor.image_processor(images[1], return_tensors="pt")["pixel_values"]
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="pdrop", k=32) as pruning:
        lvlm.model(input_ids=ids, pixel_values=pixels)
    (image,) = pruning.report().images
    assert image.start == span.start > 0
    assert [(layer, list(kept)) for layer, kept in image.stages] == [
        (layer, kept.tolist()) for layer, kept in span.stages
    ]


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_a_method_in_stages_on_a_one_layer_model_is_refused_in_one_line(method, asap):
    """Its stages at D/4, D/2, 3D/4 of one layer are none: an IndexError reached the user."""
    result = asap("run", "examples/car.png", "what?", "-m", "bench", "--layers", 1, "--method", method)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: {method} prunes in stages between decoder layers; this model has 1 decoder layer, so no layer to "
        "prune before"
    )
