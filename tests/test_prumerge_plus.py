"""LLaVA-PruMerge+ (`--method prumerge-plus`), in test_vispruner.py's pattern.

The tap's q and k are the outputs of the tower's last layer's q_proj and k_proj, which the
authors hook; the kept tokens (in their order) and the merged pre-projector features equal the
independent reference (tests/reference_baselines.py::prumerge_plus, proven equal to the authors'
code) on the same tower outputs: the budget-matched mode where their fixed path runs, the
adaptive one always; the answers equal their pipeline re-expressed on transformers; a budget
that prunes nothing is vanilla to the bit; a padded batch answers as its rows one by one; the
CLI runs it, reports the adaptive count it kept, and refuses, in one line, what it cannot run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference_baselines import prumerge_plus
from test_visionzip import encoder_layers
from test_vispruner import greedy, taps
from transformers import AutoModelForImageTextToText

import asapcli
from asapcli.engine import image_spans
from asapcli.engine.methods import SpanView
from asapcli.engine.methods.prumerge_plus import PruMergePlus
from asapcli.engine.methods.tower import claim_slots
from asapcli.engine.vision import VisionCues
from asapcli.errors import UsageError
from asapcli.runtime.inputs import build_batch_inputs, build_inputs, load_image, user_message
from asapcli.runtime.loading import load

CAR = Path(__file__).resolve().parent.parent / "examples" / "car.png"
# k = 2 N r + 1 for a ratio r = 1/m (m dividing N): where the authors' fixed path runs
FIXED = {"demo": [(145, 1 / 8), (129, 1 / 9), (73, 1 / 16)], "tiny": [(17, 1 / 8), (33, 1 / 4)]}


@pytest.fixture(scope="module")
def demo():
    lvlm = load("demo", device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    return lvlm, inputs


@pytest.fixture(scope="module")
def tiny(llava_path, images):
    lvlm = load(str(llava_path), device="cpu")
    return lvlm, build_inputs(lvlm.processor, [user_message("what is it?", 1)], images[:1])


def captured(model, inputs, **options):
    with torch.inference_mode(), asapcli.pruned(model, method="prumerge-plus", **options) as pruning:
        model(**inputs)
    return pruning


def ours(cues: VisionCues, k: int, adaptive: bool):
    """The method's tokens before the projector, in the authors' order."""
    span = SpanView(start=0, hidden=cues.features, vision=replace(cues, project=lambda tokens: tokens))
    return PruMergePlus(adaptive=adaptive).select(span, k).in_sequence(True)


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_the_tap_gives_the_last_layers_q_and_k_as_the_authors_hooks(which, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    model = AutoModelForImageTextToText.from_pretrained(lvlm.model.name_or_path).eval()
    outputs = {}
    last = encoder_layers(model)[-1].self_attn
    hooks = [
        last.q_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("q", o)),
        last.k_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("k", o)),
    ]
    with torch.inference_mode():
        model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    (cues,) = captured(lvlm.model, inputs, k=8).tap.cues
    assert torch.allclose(cues.query_key[0], outputs["q"][0], atol=1e-6, rtol=0)
    assert torch.allclose(cues.query_key[1], outputs["k"][0], atol=1e-6, rtol=0)
    assert cues.keys is None  # VisionZip's, not computed here
    assert not taps(lvlm.model)


def _slots(picked: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each picked patch's slot, then the extra token's, by the tower methods' rule."""
    return torch.tensor(claim_slots(picked.tolist() + [-1], tokens))


def check(pruning, k: int, adaptive: bool, ratio: float = 1 / 8):
    """The block's kept slots and our merged tokens against the reference on the tap's outputs."""
    (cues,) = pruning.tap.cues
    (image,) = pruning.report().images
    expected = prumerge_plus(*cues.query_key, cues.features, adaptive=adaptive, reduction_ratio=ratio)
    placed = _slots(expected.kept, cues.features.shape[0]).tolist()
    assert [position - image.start for position in image.kept] == sorted(placed)
    assert len(image.kept) == expected.kept.numel() + 1 == pruning.report().kept_tokens
    mine = ours(cues, k, adaptive)
    assert mine.kept.tolist() == placed
    assert torch.allclose(mine.hidden, expected.tokens, atol=1e-5, rtol=1e-5)
    return expected


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_the_budget_matched_mode_is_the_fixed_path_where_it_runs(which, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    for k, ratio in FIXED[which]:
        expected = check(captured(lvlm.model, inputs, k=k), k, False, ratio)
        assert expected.kept.numel() == k - 1


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_the_adaptive_mode_is_the_authors_whatever_k(which, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    pruning = captured(lvlm.model, inputs, k=8, adaptive=True)
    expected = check(pruning, 8, True)
    (image,) = pruning.report().images
    assert image.roles.count("selected") == int(pruning.tap.cues[0].features.shape[0] * expected.share)


def test_other_budgets_keep_exactly_k_half_attended_half_sampled(demo, tiny):
    for (lvlm, inputs), k in [(demo, 64), (demo, 192), (tiny, 2), (tiny, 10)]:
        pruning = captured(lvlm.model, inputs, k=k)
        (image,) = pruning.report().images
        assert len(image.kept) == k == pruning.report().kept_tokens
        assert image.roles.count("selected") == k // 2 and image.roles.count("global") == 1
        (cues,) = pruning.tap.cues
        mine = ours(cues, k, False)
        extra = mine.hidden[-1]
        rest = [p for p in range(cues.features.shape[0]) if p not in set(mine.kept[:-1].tolist())]
        scores = torch.softmax(cues.query_key[0][:1] @ cues.query_key[1].T * cues.features.shape[1] ** -0.5, -1)[0, 1:]
        repeats = (k - 1) - len(set(mine.kept[:-1].tolist()))
        rest = [p for p in rest if p != int(mine.kept[-1])][repeats:] if repeats else rest
        assert torch.allclose(extra, (cues.features[rest] * scores[rest, None]).sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_tied_attention_and_keys_rank_as_the_authors_torch_calls(seed):
    """q and k with few distinct values: exactly tied attention scores and key cosines; the
    picks and each token's 32 neighbours follow torch.topk's order among equals, as theirs."""
    generator = torch.Generator().manual_seed(seed)
    query, key = (torch.randint(0, 2, (65, 8), generator=generator).float() for _ in range(2))
    cues = VisionCues(torch.zeros(1, 64), torch.randn(64, 8, generator=generator), query_key=(query, key))
    for k, ratio in [(17, 1 / 8), (33, 1 / 4)]:
        expected = prumerge_plus(query, key, cues.features, adaptive=False, reduction_ratio=ratio)
        mine = ours(cues, k, False)
        assert mine.kept.tolist() == _slots(expected.kept, 64).tolist()
        assert torch.allclose(mine.hidden, expected.tokens, atol=1e-6, rtol=1e-6), k


def test_repeated_picks_and_the_extra_token_take_the_lowest_free_slots():
    assert _slots(torch.tensor([5, 2, 4, 2, 6, 5]), 8).tolist() == [5, 2, 4, 0, 6, 1, 3]


def official_pipeline(path, inputs, k: int, renumber: bool):
    """The authors' pipeline on transformers: q and k hooked at the last layer's projections, the
    features of the feature layer, the reference's tokens (most attended, samples, extra) through
    the projector, between the prompt's text. Renumbered: positions 0..M-1 in that order (theirs);
    original: each at its slot's position (asap's reading, docs/method.md), in slot order."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    config, outputs = model.config, {}
    last = encoder_layers(model)[-1].self_attn
    hooks = [
        last.q_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("q", o)),
        last.k_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("k", o)),
    ]
    with torch.inference_mode():
        states = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        for hook in hooks:
            hook.remove()
        features = states[config.vision_feature_layer][0, 1:]
        ratio = (k - 1) / 2 / features.shape[0]
        result = prumerge_plus(outputs["q"][0], outputs["k"][0], features, adaptive=False, reduction_ratio=ratio)
        projected = model.model.multi_modal_projector(result.tokens)
        ids = inputs["input_ids"][0]
        ((start, end),) = image_spans(ids, config.image_token_id)
        placed = _slots(result.kept, end - start)
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
@pytest.mark.parametrize("which, k", [("demo", 145), ("tiny", 17)])
def test_answers_are_the_official_pipelines(positions, which, k, demo, tiny):
    lvlm, inputs = demo if which == "demo" else tiny
    logits, tokens = official_pipeline(lvlm.model.name_or_path, inputs, k, positions == "renumber")
    model, length = lvlm.model, inputs["input_ids"].shape[1]
    with torch.inference_mode(), asapcli.pruned(model, method="prumerge-plus", k=k, positions=positions):
        mine = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.allclose(mine, logits, atol=1e-5, rtol=1e-5)
    assert generated[0, length:].tolist() == tokens


def test_a_budget_that_prunes_nothing_is_vanilla_bit_for_bit(demo):
    lvlm, inputs = demo
    with torch.inference_mode():
        expected = lvlm.model(**inputs).logits
        for adaptive in (False, True):
            with asapcli.pruned(lvlm.model, method="prumerge-plus", k=576, adaptive=adaptive) as pruning:
                assert torch.equal(lvlm.model(**inputs).logits, expected)
            assert pruning.report().kept_tokens == 576


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_padded_batch_answers_as_its_rows_one_by_one(adaptive, tiny, images):
    lvlm, _ = tiny
    prompts = ["what is it?", "which colour is the shape on the left?"]
    batch = build_batch_inputs(lvlm.processor, list(zip(prompts, images, strict=True)))
    options = {"method": "prumerge-plus", "k": 13, "positions": "renumber", "adaptive": adaptive}
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
    with pytest.raises(UsageError, match="0 at k = 4, where it needs 1; give k at least 5"):
        captured(lvlm.model, inputs, k=4)
    assert not taps(lvlm.model)


def test_the_cli_runs_it_and_reports_the_adaptive_count(asap):
    result = asap("run", CAR, "what colour is the car?", "--method", "prumerge-plus", "-k", 64, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kept_tokens"] == 64 and data["layer"] == 0 and data["options"]["adaptive"] is False
    args = ("run", CAR, "what colour is the car?", "--method", "prumerge-plus", "--adaptive", "--json")
    data = json.loads(asap(*args).stdout)
    assert data["kept_tokens"] == 147 and data["options"]["adaptive"] is True  # the car's own count, not k
    result = asap("compare", CAR, "what colour is the car?", "--methods", "visionzip,prumerge-plus", "-k", 64)
    assert result.exit_code == 0, result.output
    result = asap("flops", "--method", "prumerge-plus", "-k", 64, "--json")
    assert result.exit_code == 0, result.output


def test_refusals_are_one_line(asap, llava_next_path, image_file):
    result = asap("run", image_file, "hi", "-m", llava_next_path, "--method", "prumerge-plus", "-k", 4)
    (line,) = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and line.startswith("Error: prumerge-plus on a tiled model gives each of an image's")
    assert line.endswith("k // 5 tokens: 0 at k = 4, where it needs 1; give k at least 5")
    result = asap("run", image_file, "hi", "-m", llava_next_path, "--method", "prumerge-plus", "-k", 4, "--adaptive")
    assert result.exit_code == 0, result.output  # the image sets its own count
    result = asap("run", CAR, "hi", "--method", "fastv", "--adaptive")
    (line,) = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and line.startswith("Error: --adaptive is not an option of fastv")
    result = asap("chat", CAR, "--method", "prumerge-plus", "--max-tokens", 2, input="what colour?\nsure?\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2  # chat goes on from its cut cache


@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_an_adaptive_count_that_reaches_the_span_keeps_it_whole(family, model_paths, image_file, asap, monkeypatch):
    """More than a sixth of the patches outliers: the adaptive picks take every patch, the step keeps
    the span as it is (it failed writing the span's states into the tensor they were a view of)."""
    from asapcli.engine import ops

    monkeypatch.setattr(ops, "outlier_count", lambda scores: scores.shape[0] // 3)
    common = [image_file, "what colour?", "-m", model_paths[family], "--max-tokens", 4, "--threads", 1, "--json"]
    pruned = asap("run", *common, "--method", "prumerge-plus", "-k", 16, "--adaptive")
    assert pruned.exit_code == 0, pruned.output
    vanilla = json.loads(asap("run", *common, "--method", "vanilla").stdout)
    answer = json.loads(pruned.stdout)
    assert answer["kept_tokens"] == answer["visual_tokens"] == vanilla["visual_tokens"]
    assert answer["answer"] == vanilla["answer"]
    # picks of all patches but the last, and the extra token for it: exactly the span's count, kept as it is
    lvlm = load(str(model_paths[family]), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what colour?", 1)], [load_image(image_file)])
    (image,) = captured(lvlm.model, inputs, k=16, adaptive=True).report().images
    assert set(image.roles) == {"kept"}  # the span's own states, not projected picks and an extra token


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_merged_count_is_the_span_tokens_the_extra_tokens_took_in(llava_next_path, images, adaptive):
    """On LLaVA-NeXT unpadding cuts patches of a tile: those the extra token averaged but that have
    no slot in the span are not the span's merged tokens (--json said 75 merged of 70 visual)."""
    lvlm = load(str(llava_next_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what is it?", 1)], images[:1])
    report = captured(lvlm.model, inputs, k=10, adaptive=adaptive).report()
    (image,) = report.images
    took_in = [set(absorbed) for role, absorbed in zip(image.roles, image.absorbed) if role == "global"]
    assert report.merged_tokens == sum(len(positions) for positions in took_in)
    assert 0 < report.merged_tokens <= report.visual_tokens
