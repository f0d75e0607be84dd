"""VisionZip (`--method visionzip`), in test_vispruner.py's pattern.

The tap's extras (the [CLS] feature and the head-mean keys of the feature layer) are what the
authors' code reads; the kept sets and the merged pre-projector features equal the independent
reference (tests/reference_baselines.py::visionzip_compress, proven equal to the authors' code)
on the same tower outputs; the answers equal the authors' pipeline re-expressed on transformers
(dominant then contextual tokens through the projector, renumbered; or each token at its slot's
own position); a budget that prunes nothing is vanilla to the bit; a padded batch answers as its
rows one by one; the CLI runs it and refuses, in one line, what it cannot run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference_baselines import VISIONZIP_SPLITS, visionzip_compress
from test_vispruner import full_attention, greedy, taps
from transformers import AutoModelForImageTextToText

import asapcli
from asapcli.engine import image_spans
from asapcli.engine.methods import SpanView
from asapcli.engine.methods.visionzip import VisionZip, contextual_count
from asapcli.engine.vision import VisionCues
from asapcli.errors import UsageError
from asapcli.runtime.inputs import build_batch_inputs, build_inputs, load_image, user_message
from asapcli.runtime.loading import load

CAR = Path(__file__).resolve().parent.parent / "examples" / "car.png"


@pytest.fixture(scope="module")
def demo():
    lvlm = load("demo", device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    return lvlm, inputs


@pytest.fixture(scope="module")
def tiny(llava_path, images):
    lvlm = load(str(llava_path), device="cpu")
    return lvlm, build_inputs(lvlm.processor, [user_message("what is it?", 1)], images[:1])


def encoder_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def captured(model, inputs, **options):
    with torch.inference_mode(), asapcli.pruned(model, method="visionzip", **options) as pruning:
        model(**inputs)
    return pruning


def reference(cues: VisionCues, k: int, contextual: int | None = None, tie_break: str = "torch"):
    """The reference on the tap's outputs: [CLS] and patches as one sequence, [CLS] first."""
    contextual = contextual_count(k, contextual)
    hidden = torch.cat([cues.cls[None], cues.features])
    return visionzip_compress(cues.attention, hidden, cues.keys, k - contextual, contextual, tie_break=tie_break)


def slots(result, patches: int) -> list[int]:
    """Where each of the reference's tokens sits, in its order: [CLS] at the first patch no other
    token takes, the dominant patches and the contextual targets at their own."""
    placed = (result.dominant_positions[1:] - 1).tolist() + (result.target_positions - 1).tolist()
    free = next(index for index in range(patches) if index not in set(placed))
    return [free, *placed]


def test_the_split_is_the_authors_at_their_budgets_and_rounds_half_up():
    assert {k: (k - contextual_count(k, None), contextual_count(k, None)) for k in VISIONZIP_SPLITS} == VISIONZIP_SPLITS
    assert [contextual_count(k, None) for k in (2, 3, 16, 100)] == [1, 1, 3, 16]  # 16: 2.5 rounds up
    assert contextual_count(64, 5) == 5


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_the_tap_gives_the_cls_feature_and_the_layers_head_mean_keys(which, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    model = AutoModelForImageTextToText.from_pretrained(lvlm.model.name_or_path).eval()
    layer_index = model.config.vision_feature_layer
    layers = encoder_layers(model)
    with torch.inference_mode():
        states = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer = layers[layer_index % len(layers)]
        attn = layer.self_attn
        keys = attn.k_proj(layer.layer_norm1(states[layer_index % len(layers)]))  # the layer's input
        keys = keys.view(*keys.shape[:2], -1, attn.head_dim).transpose(1, 2).mean(1)[0]
    (cues,) = captured(lvlm.model, inputs, k=8).tap.cues
    assert torch.equal(cues.cls, states[layer_index][0, 0])
    assert torch.allclose(cues.keys, keys, atol=1e-6, rtol=0)
    assert cues.query_key is None  # PruMerge+'s, not computed for VisionZip


def merged_features(cues: VisionCues, k: int, contextual: int | None = None):
    """The method's tokens before the projector, in the authors' order."""
    span = SpanView(start=0, hidden=cues.features, vision=replace(cues, project=lambda tokens: tokens))
    return VisionZip(contextual=contextual).select(span, k).in_sequence(True)


@pytest.mark.parametrize("which, budgets", [("demo", (2, 64, 100, 128, 192)), ("tiny", (2, 8, 13, 40))])
def test_kept_sets_and_merged_features_are_the_references(which, budgets, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    for k in budgets:
        pruning = captured(lvlm.model, inputs, k=k)
        (cues,) = pruning.tap.cues
        (image,) = pruning.report().images
        expected = reference(cues, k)
        placed = slots(expected, cues.features.shape[0])
        assert [position - image.start for position in image.kept] == sorted(placed), k
        roles = dict(zip(placed, ["global"] + ["selected"] * (len(placed) - 1)))
        roles.update({slot: "contextual" for slot in (expected.target_positions - 1).tolist()})
        assert image.roles == [roles[slot] for slot in sorted(placed)]
        ours = merged_features(cues, k)
        assert ours.kept.tolist() == placed
        assert torch.allclose(ours.hidden, expected.tokens, atol=1e-5, rtol=1e-5), k


def test_a_given_contextual_count_and_what_each_contextual_token_absorbed(tiny):
    lvlm, inputs = tiny
    pruning = captured(lvlm.model, inputs, k=20, contextual=7)
    (cues,) = pruning.tap.cues
    (image,) = pruning.report().images
    expected = reference(cues, 20, 7)
    assert image.roles.count("contextual") == 7 and image.roles.count("selected") == 12
    remaining = [p for p in range(1, 65) if p not in expected.dominant_positions.tolist()]
    others = [p for p in remaining if p not in expected.target_positions.tolist()]
    absorbed = {int(t) - 1: [] for t in expected.target_positions}
    for patch, target in zip(others, expected.assignment.tolist()):
        absorbed[int(expected.target_positions[target]) - 1].append(patch - 1)
    by_slot = dict(zip((p - image.start for p in image.kept), image.absorbed))
    assert {slot: [p - image.start for p in by_slot[slot]] for slot in absorbed} == absorbed
    assert pruning.report().merged_tokens == len(others)


@pytest.mark.parametrize("seed", range(3))
def test_tied_attention_and_keys_rank_as_the_authors_torch_calls(seed):
    """[CLS] attention with many exact ties, keys with exact duplicates: torch.topk's order among
    equal scores and argmax's first target, as the authors' code."""
    generator = torch.Generator().manual_seed(seed)
    attention = torch.randint(0, 4, (2, 64), generator=generator).float()
    features = torch.randn(64, 8, generator=generator)
    cues = VisionCues(attention, features, torch.randn(8, generator=generator))
    cues = replace(cues, keys=torch.randint(0, 3, (65, 4), generator=generator).float() + 0.5)
    for k in (5, 20, 33):
        expected = reference(cues, k)
        ours = merged_features(cues, k)
        assert ours.kept.tolist() == slots(expected, 64), k
        assert torch.allclose(ours.hidden, expected.tokens, atol=1e-6, rtol=1e-6)


def official_pipeline(path, inputs, k: int, renumber: bool):
    """The authors' pipeline on transformers: the feature layer's [CLS] row from a full attention
    map (summed over heads by the reference), its head-mean raw keys, the reference's tokens
    (dominant, then contextual) through the projector, between the prompt's text. Renumbered:
    positions 0..M-1 in that order (theirs); original: each token at its slot's own position, in
    slot order (asap's reading, docs/method.md)."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    config = model.config
    with torch.inference_mode():
        states = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layers = encoder_layers(model)
        layer = layers[config.vision_feature_layer % len(layers)]
        layer_input = states[config.vision_feature_layer % len(layers)]
        attention = full_attention(layer, layer_input)[0, :, 0, 1:]
        keys = layer.self_attn.k_proj(layer.layer_norm1(layer_input))[0]
        keys = keys.view(keys.shape[0], -1, layer.self_attn.head_dim).mean(1)
        hidden = states[config.vision_feature_layer][0]
        contextual = contextual_count(k, None)
        result = visionzip_compress(attention, hidden, keys, k - contextual, contextual)
        projected = model.model.multi_modal_projector(result.tokens)
        ids = inputs["input_ids"][0]
        ((start, end),) = image_spans(ids, config.image_token_id)
        placed = torch.tensor(slots(result, end - start))
        if not renumber:
            placed, order = placed.sort()
            projected = projected[order]
        embed = model.get_input_embeddings()
        embeds = torch.cat([embed(ids[:start]), projected, embed(ids[end:])])[None]
        positions = torch.cat([torch.arange(start), placed + start, torch.arange(end, len(ids))])[None]
        positions = torch.arange(embeds.shape[1])[None] if renumber else positions
        logits = model(inputs_embeds=embeds, position_ids=positions).logits[0, -1]
        tokens = greedy(model, embeds, positions, 5)
    return logits, tokens


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("which, k", [("demo", 64), ("tiny", 13)])
def test_answers_are_the_official_pipelines(positions, which, k, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    logits, tokens = official_pipeline(lvlm.model.name_or_path, inputs, k, positions == "renumber")
    model, length = lvlm.model, inputs["input_ids"].shape[1]
    with torch.inference_mode(), asapcli.pruned(model, method="visionzip", k=k, positions=positions):
        ours = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.allclose(ours, logits, atol=1e-5, rtol=1e-5)
    assert generated[0, length:].tolist() == tokens


def test_a_budget_that_prunes_nothing_is_vanilla_bit_for_bit(demo):
    lvlm, inputs = demo
    with torch.inference_mode():
        expected = lvlm.model(**inputs).logits
        with asapcli.pruned(lvlm.model, method="visionzip", k=576, contextual=3) as pruning:
            assert torch.equal(lvlm.model(**inputs).logits, expected)
    assert pruning.report().kept_tokens == 576


def test_a_padded_batch_answers_as_its_rows_one_by_one(tiny, images):
    lvlm, _ = tiny
    prompts = ["what is it?", "which colour is the shape on the left?"]
    batch = build_batch_inputs(lvlm.processor, list(zip(prompts, images, strict=True)))
    options = {"method": "visionzip", "k": 13, "positions": "renumber"}
    with torch.inference_mode(), asapcli.pruned(lvlm.model, **options) as pruning:
        answers = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    kept = [image.kept for image in pruning.report().images]
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        single = build_inputs(lvlm.processor, [user_message(prompt, 1)], [image])
        with torch.inference_mode(), asapcli.pruned(lvlm.model, **options) as alone:
            answer = lvlm.model.generate(**single, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert alone.report().images[0].kept == kept[row]
        assert answer[0, -4:].tolist() == answers[row, -4:].tolist()


def test_a_tiled_budget_under_what_each_tile_needs_is_refused(llava_next_path, images):
    """On LLaVA-NeXT each of up to 5 tower items keeps k // 5 tokens (tests/test_next_tower_methods.py)."""
    lvlm = load(str(llava_next_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 1)], images[:1])
    with pytest.raises(UsageError, match="1 at k = 8, where it needs 2; give k at least 10"):
        captured(lvlm.model, inputs, k=8)
    assert not taps(lvlm.model)


def test_the_cli_runs_it(asap):
    result = asap("run", CAR, "what colour is the car?", "--method", "visionzip", "-k", 64, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kept_tokens"] == 64 and data["layer"] == 0 and data["options"]["contextual"] is None
    result = asap("compare", CAR, "what colour is the car?", "--methods", "vispruner,visionzip", "-k", 64)
    assert result.exit_code == 0, result.output
    result = asap("flops", "--method", "visionzip", "-k", 64, "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "options, message",
    [
        (("--contextual", 0), "Error: contextual must be at least 1, got 0"),
        (("--contextual", 8), "Error: contextual must be at most k - 1 = 7"),
        (("--contextual", "two"), "Error: Invalid value for '--contextual': 'two' is not a whole number"),
        (("--contextual", "1.5"), "Error: Invalid value for '--contextual': '1.5' is not a whole number"),
        (("--contextual", "\u0661"), "Error: Invalid value for '--contextual': '\u0661' is not a whole number"),
        (("-k", 1), "Error: visionzip keeps the [CLS] token and at least one contextual token"),
    ],
)
def test_bad_budgets_and_counts_are_refused_in_one_line(options, message, asap, llava_path, image_file):
    args = ("-k", 8, *options) if "-k" not in options else options
    result = asap("run", image_file, "hi", "-m", llava_path, "--method", "visionzip", *args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(message)


def test_budgets_and_commands_it_cannot_run_are_refused_in_one_line(asap, llava_next_path, image_file):
    result = asap("run", image_file, "hi", "-m", llava_next_path, "--method", "visionzip", "-k", 8)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: visionzip on a tiled model gives each of an image's up to 5 tower items")
    assert line.endswith("k // 5 tokens: 1 at k = 8, where it needs 2; give k at least 10")
    result = asap("chat", CAR, "--method", "visionzip", "--max-tokens", 2, input="what colour?\nsure?\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2  # chat goes on from its cut cache
