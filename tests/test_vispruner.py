"""VisPruner (`--method vispruner`) and the vision tower's tap it reads (engine/vision.py).

The tap: the [CLS] row it recomputes at the feature layer equals an eager forward's
`attentions[vision_feature_layer]` (to 1e-6), its features are `hidden_states[vision_feature_layer]`
without [CLS], per image and per LLaVA-NeXT tile; it is installed only inside the block.
The method: its kept sets are those of the independent reference (tests/reference_baselines.py,
proven equal to the authors' code) on the same tower outputs; its answers are those of the
authors' pipeline re-expressed here on transformers (only the kept patches' projected features,
in patch order, as a shorter prompt); a budget that prunes nothing is vanilla to the bit; a
padded batch answers as its rows one by one; the CLI runs it and refuses it where it cannot run."""

import json
from pathlib import Path

import pytest
import tiny_models
import torch
from reference_baselines import vispruner_select
from transformers import AutoModelForImageTextToText, AutoTokenizer

import asapcli
from asapcli.engine import UnsupportedModel, image_spans
from asapcli.engine.methods import SpanView
from asapcli.engine.methods.vispruner import VisPruner
from asapcli.engine.vision import VisionCues, VisionTap
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


def tower_outputs(path, inputs, eager: bool):
    """An untouched copy's tower forward: its attentions (eager only) and hidden states."""
    options = {"attn_implementation": {"vision_config": "eager"}} if eager else {}
    model = AutoModelForImageTextToText.from_pretrained(path, **options).eval()
    with torch.inference_mode():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=eager, output_hidden_states=True)
    return model, out


def captured(model, inputs, **options):
    with torch.inference_mode(), asapcli.pruned(model, method="vispruner", **options) as pruning:
        model(**inputs)
    return pruning


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_the_tap_is_the_eager_cls_row_and_the_feature_layers_patches(which, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    path = lvlm.model.name_or_path
    layer = lvlm.model.config.vision_feature_layer
    _, eager = tower_outputs(path, inputs, eager=True)
    _, own = tower_outputs(path, inputs, eager=False)
    pruning = captured(lvlm.model, inputs, k=8)
    (cues,) = pruning.tap.cues
    assert torch.allclose(cues.attention, eager.attentions[layer][0, :, 0, 1:], atol=1e-6, rtol=0)
    assert torch.equal(cues.features, own.hidden_states[layer][0, 1:])
    assert not taps(lvlm.model)  # removed after the block


def taps(model) -> list:
    """The VisionTap hooks left on `model` (transformers adds hooks of its own on a first forward)."""
    hooks = [hook for module in model.modules() for hook in module._forward_hooks.values()]
    return [hook for hook in hooks if isinstance(getattr(hook, "__self__", None), VisionTap)]


def test_each_llava_next_tile_keeps_its_own_cues(llava_next_path, images):
    lvlm = load(str(llava_next_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what?", 2)], images)
    pixels = inputs["pixel_values"].flatten(0, 1)  # every tile of both images, as the tower sees them
    _, eager = tower_outputs(llava_next_path, {"pixel_values": pixels}, eager=True)
    tap = VisionTap(lvlm.model, "vispruner").install()
    try:
        with torch.inference_mode():
            lvlm.model.model.vision_tower(pixels)
    finally:
        tap.remove()
    assert len(tap.cues) == pixels.shape[0]
    for tile, cues in enumerate(tap.cues):
        assert torch.allclose(cues.attention, eager.attentions[-1][tile, :, 0, 1:], atol=1e-6, rtol=0)


def test_a_tiled_images_layout_names_the_patch_each_of_its_tokens_shows(llava_next_path, images):
    """Each token of a LLaVA-NeXT image span is the projected feature of the tile and patch its
    TiledCues' `source` names (the newline embedding where it says -1): the model's own packing."""
    lvlm = load(str(llava_next_path), device="cpu")
    model, inputs = lvlm.model, build_inputs(lvlm.processor, [user_message("what?", 2)], images)
    sizes = inputs["image_sizes"]
    tap = VisionTap(model, "vispruner").install()
    try:
        with torch.inference_mode():
            packed = model.model.get_image_features(inputs["pixel_values"], sizes).pooler_output
            tiled = [tap.image(number, 2) for number in range(2)]
    finally:
        tap.remove()
    assert "get_image_features" not in vars(model.model)  # the model's own method again
    assert len({len(image.items) for image in tiled}) == 2  # the two images tile differently
    for image, tokens in zip(tiled, packed):
        with torch.inference_mode():
            flat = model.model.multi_modal_projector(torch.cat([item.features for item in image.items]))
        newline = model.model.image_newline.expand(len(image.source), -1)
        shown = torch.where((image.source >= 0)[:, None], flat[image.source.clamp(min=0)], newline)
        assert torch.allclose(shown, tokens, atol=1e-6, rtol=0)
        assert image.most_items == 5 and image.grid[0] * image.grid[1] == len(image.items) - 1


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_the_kept_sets_are_the_references_on_the_demo_model(ratio, demo):
    lvlm, inputs = demo
    for k in (1, 64, 102, 128, 300):
        pruning = captured(lvlm.model, inputs, k=k, important_ratio=ratio)
        (cues,) = pruning.tap.cues
        (image,) = pruning.report().images
        expected = vispruner_select(cues.attention, cues.features, k, ratio, residual_mode="natural").kept
        assert [position - image.start for position in image.kept] == expected.tolist(), k
        assert image.roles.count("selected") == int(k * ratio)


def test_the_kept_sets_are_the_references_on_the_tiny_llava(tiny):
    lvlm, inputs = tiny
    for k, ratio in [(8, 0.5), (13, 0.5), (20, 0.3), (63, 0.5)]:
        pruning = captured(lvlm.model, inputs, k=k, important_ratio=ratio)
        (cues,) = pruning.tap.cues
        (image,) = pruning.report().images
        expected = vispruner_select(cues.attention, cues.features, k, ratio, residual_mode="natural").kept
        assert [position - image.start for position in image.kept] == expected.tolist(), (k, ratio)


@pytest.mark.parametrize("seed", range(3))
def test_tied_attention_ranks_as_torchs_argsort(seed):
    """[CLS] attention with many exact ties (and features with exact duplicates): the ranks are
    torch's descending argsort, as the authors' code, not a stable sort's."""
    generator = torch.Generator().manual_seed(seed)
    attention = torch.randint(0, 4, (2, 64), generator=generator).float()
    features = torch.randint(0, 3, (64, 8), generator=generator).float() + 0.5
    span = SpanView(start=0, hidden=torch.randn(64, 4, generator=generator), vision=VisionCues(attention, features))
    for k, ratio in [(20, 0.5), (33, 0.5), (40, 0.8)]:
        kept = VisPruner(important_ratio=ratio).select(span, k).kept
        expected = vispruner_select(attention, features, k, ratio, residual_mode="natural", tie_break="torch")
        assert kept.tolist() == expected.kept.tolist(), k


def official_pipeline(path, inputs, k: int, renumber: bool):
    """The authors' pipeline on transformers: the [CLS] row of the feature layer computed in full
    (softmax of every query against every key, row 0), the reference's kept set, the projector on
    every patch, then only the kept patches' features in patch order between the prompt's text:
    first-token logits and 5 greedy tokens, positions 0..M-1 (renumber) or the original ones."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    config = model.config
    with torch.inference_mode():
        states = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        tower = model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        layer = layers[config.vision_feature_layer % len(layers)]
        attention = full_attention(layer, states[config.vision_feature_layer % len(layers)])[0, :, 0, 1:]
        features = states[config.vision_feature_layer][0, 1:]
        kept = vispruner_select(attention, features, k, residual_mode="natural").kept
        projected = model.model.multi_modal_projector(features)[kept]
        ids = inputs["input_ids"][0]
        ((start, end),) = image_spans(ids, config.image_token_id)
        embed = model.get_input_embeddings()
        embeds = torch.cat([embed(ids[:start]), projected, embed(ids[end:])])[None]
        positions = torch.cat([torch.arange(start), kept + start, torch.arange(end, len(ids))])[None]
        positions = torch.arange(embeds.shape[1])[None] if renumber else positions
        logits = model(inputs_embeds=embeds, position_ids=positions).logits[0, -1]
        tokens = greedy(model, embeds, positions, 5)
    return logits, tokens


def full_attention(layer, hidden):
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    shape = (*hidden.shape[:2], -1, attn.head_dim)
    query, key = (proj(normed).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
    return torch.softmax((query @ key.transpose(2, 3)) * attn.scale, dim=-1, dtype=torch.float32)


def greedy(model, embeds, positions, steps: int) -> list[int]:
    """Greedy decoding by hand: each step feeds the last token at the next position; stops after
    an end-of-sequence token, as generate() does."""
    out = model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
    tokens, cache, position = [], out.past_key_values, int(positions[0, -1])
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    for _ in range(steps):
        tokens.append(int(out.logits[0, -1].argmax()))
        if tokens[-1] in ends:
            break
        position += 1
        token = torch.tensor([[tokens[-1]]])
        out = model(input_ids=token, position_ids=torch.tensor([[position]]), past_key_values=cache, use_cache=True)
    return tokens


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("which, k", [("demo", 64), ("demo", 102), ("tiny", 13)])
def test_answers_are_the_official_pipelines(positions, which, k, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    logits, tokens = official_pipeline(lvlm.model.name_or_path, inputs, k, positions == "renumber")
    model, length = lvlm.model, inputs["input_ids"].shape[1]
    with torch.inference_mode(), asapcli.pruned(model, method="vispruner", k=k, positions=positions):
        ours = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.allclose(ours, logits, atol=1e-5, rtol=1e-5)
    assert generated[0, length:].tolist() == tokens


def test_a_budget_that_prunes_nothing_is_vanilla_bit_for_bit(demo):
    lvlm, inputs = demo
    with torch.inference_mode():
        expected = lvlm.model(**inputs).logits
        with asapcli.pruned(lvlm.model, method="vispruner", k=576) as pruning:
            assert torch.equal(lvlm.model(**inputs).logits, expected)
    assert pruning.report().kept_tokens == 576


def test_a_padded_batch_answers_as_its_rows_one_by_one(tiny, images):
    lvlm, _ = tiny
    prompts = ["what is it?", "which colour is the shape on the left?"]
    batch = build_batch_inputs(lvlm.processor, list(zip(prompts, images, strict=True)))
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="vispruner", k=13) as pruning:
        answers = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    kept = [image.kept for image in pruning.report().images]
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        single = build_inputs(lvlm.processor, [user_message(prompt, 1)], [image])
        with torch.inference_mode(), asapcli.pruned(lvlm.model, method="vispruner", k=13) as alone:
            answer = lvlm.model.generate(**single, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert alone.report().images[0].kept == kept[row]
        assert answer[0, -4:].tolist() == answers[row, -4:].tolist()


@pytest.mark.parametrize("build, make_inputs", [(tiny_models.build_qwen2_5_vl, tiny_models.qwen_inputs)])
def test_a_tower_without_cls_is_refused_when_the_block_opens(build, make_inputs, tmp_path, images):
    path = build(tmp_path / "model")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with pytest.raises(UnsupportedModel, match="no \\[CLS\\] token"), asapcli.pruned(model, method="vispruner", k=8):
        pass
    assert not taps(model)
    inputs = make_inputs(AutoTokenizer.from_pretrained(path), images[:1], "what?")
    assert inputs["input_ids"].shape[1] > 0


def test_the_cli_runs_it(asap, llava_path, image_file):
    result = asap("run", CAR, "what colour is the car?", "--method", "vispruner", "-k", 64, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kept_tokens"] == 64 and data["layer"] == 0 and data["options"]["important_ratio"] == 0.5
    result = asap("compare", CAR, "what colour is the car?", "--methods", "fastv,vispruner", "-k", 64)
    assert result.exit_code == 0, result.output
    result = asap("flops", "--method", "vispruner", "-k", 64, "--json")
    assert result.exit_code == 0, result.output
    result = asap("run", image_file, "hi", "-m", llava_path, "--method", "vispruner", "-k", 8, "--important-ratio", 2)
    assert result.exit_code == 2 and "important-ratio must be in [0, 1]" in result.stderr


def test_chat_goes_on_from_its_cut_cache(asap):
    result = asap("chat", CAR, "--method", "vispruner", "--max-tokens", 2, input="what colour?\nsure?\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2


def test_profile_on_bench(asap):
    result = asap(
        "profile", "-m", "bench", "--methods", "vanilla,vispruner", "-k", 128, "--json",
        "--repeats", "1", "--warmup", "0", "--decode-tokens", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["method"] for record in records] == ["vanilla", "vispruner"]
