"""The engine in Qwen2.5-VL (3-D M-RoPE positions) and InternVL (tiles in one image span), on
tiny random-weight models loaded through from_pretrained, against transformers' own forward and
generate(); and a clear error for the models the engine cannot drive."""

import importlib.util
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import tiny_models
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    BatchFeature,
    DynamicCache,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
)

from asapcli.engine import PrunedDecoder, UnsupportedModel, check_supported, image_spans, install
from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.generation import generate
from asapcli.runtime.loading import Loaded, prepare

BUILDERS = {
    "qwen2.5-vl": (tiny_models.build_qwen2_5_vl, tiny_models.qwen_inputs),
    "internvl": (tiny_models.build_internvl, tiny_models.internvl_inputs),
}


@dataclass
class Family:
    name: str
    path: str
    loaded: Loaded
    reference: torch.nn.Module  # the same checkpoint, transformers' own code untouched
    inputs: BatchFeature  # one user turn with two images


@pytest.fixture(scope="module")
def families(tmp_path_factory, images):
    built = {}
    for name, (build, make_inputs) in BUILDERS.items():
        path = build(tmp_path_factory.mktemp(name))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path)
        loaded = prepare(model, SimpleNamespace(tokenizer=tokenizer), name)
        reference = AutoModelForImageTextToText.from_pretrained(path).eval()
        built[name] = Family(name, str(path), loaded, reference, make_inputs(tokenizer, images, "what is where?"))
    return built


@pytest.fixture(params=list(BUILDERS))
def family(request, families):
    return families[request.param]


def logits(loaded, inputs, pruning=None, cache=None):
    return pruned_logits(loaded, inputs, pruning, cache)[0]


def pruned_logits(loaded, inputs, pruning=None, cache=None):
    """The logits of one forward call pruned by the plan `pruning` made by hand, and what its
    prefill did."""
    with torch.inference_mode(), tiny_models.pruned_by(loaded.model, pruning) as session:
        out = loaded.model(**inputs, past_key_values=cache, use_cache=cache is not None).logits
    return out, (session.prefills[0] if session.prefills else None)


def test_each_image_is_one_span_of_its_own_tokens(family):
    ids = family.inputs["input_ids"][0]
    spans = image_spans(ids, family.loaded.image_token_id)
    assert len(spans) == 2
    if family.name == "internvl":  # every tile of an image inside one <img> ... </img>
        tiles = family.inputs["pixel_values"].shape[0]
        assert sum(end - start for start, end in spans) == tiles * tiny_models.INTERNVL_TILE_TOKENS
        start_token = family.loaded.processor.tokenizer.convert_tokens_to_ids("<img>")
        assert all(ids[start - 1] == start_token for start, _ in spans)
    else:  # one pad per merged 2 x 2 group of 4 px patches
        grids = family.inputs["image_grid_thw"]
        assert [end - start for start, end in spans] == [int(grid.prod()) // 4 for grid in grids]


def test_vanilla_matches_transformers_forward_and_generate(family):
    inputs, loaded = family.inputs, family.loaded
    pruning = plan_for(loaded, inputs["input_ids"][0], PruneSettings(method="vanilla"))
    with torch.inference_mode():
        expected = family.reference(**inputs).logits
        expected_tokens = family.reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.allclose(logits(loaded, inputs, pruning), expected, atol=1e-5)
    with torch.inference_mode(), tiny_models.pruned_by(loaded.model, pruning):
        tokens = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, expected_tokens)


def test_asap_with_nothing_to_prune_and_vanishing_lambda_is_vanilla(family):
    inputs, loaded = family.inputs, family.loaded
    pruning = plan_for(loaded, inputs["input_ids"][0], PruneSettings(method="asap", k=10_000, lambda_max=1e-12))
    with torch.inference_mode():
        expected = family.reference(**inputs).logits
    assert torch.allclose(logits(loaded, inputs, pruning), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["fastv", "random", "asap"])
def test_layers_from_l_on_hold_text_plus_k_per_image(family, method):
    loaded, k, layer = family.loaded, 8, 2
    ids = family.inputs["input_ids"][0]
    spans = image_spans(ids, loaded.image_token_id)
    visual = sum(end - start for start, end in spans)
    pruning = plan_for(loaded, ids, PruneSettings(method=method, k=k, layer=layer))
    cache = DynamicCache(config=loaded.model.config.get_text_config())
    out, done = pruned_logits(loaded, family.inputs, pruning, cache)
    text = ids.numel() - visual
    lengths = [cache.get_seq_length(i) for i in range(loaded.num_layers)]
    assert lengths == [ids.numel()] * layer + [text + 2 * k] * (loaded.num_layers - layer)
    assert out.shape[1] == text + 2 * k
    for kept, (start, end) in zip((record.kept for record in done.pruned()), spans, strict=True):
        assert len(kept) == k and kept.min() >= start and kept.max() < end


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm", "divprune"])
def test_each_layer_holds_what_the_methods_schedule_leaves(family, method):
    """The multi-stage (PyramidDrop, SparseVLM) and before-the-LLM (DivPrune) methods in
    M-RoPE and tiled models, with original positions (renumbered ones need 1-D positions): each
    layer's cache holds the text and what the schedule leaves."""
    loaded = family.loaded
    ids = family.inputs["input_ids"][0]
    visual = sum(end - start for start, end in image_spans(ids, loaded.image_token_id))
    pruning = plan_for(loaded, ids, PruneSettings(method=method, k=8, layer=2))
    cache = DynamicCache(config=loaded.model.config.get_text_config())
    out, done = pruned_logits(loaded, family.inputs, pruning, cache)
    steps = done.prompt().steps
    left = [min([visual] + [count for at, count in steps if at <= layer]) for layer in range(loaded.num_layers)]
    assert steps and left[-1] < visual  # it pruned
    assert [cache.get_seq_length(i) for i in range(loaded.num_layers)] == [ids.numel() - visual + n for n in left]
    assert out.shape[1] == ids.numel() - visual + left[-1] and torch.isfinite(out).all()


def test_cached_decoding_equals_a_pruned_prefill_of_the_same_tokens(family):
    """Decoding steps continue from the cache with the model's own positions (Qwen: its rope
    deltas); a from-scratch pruned prefill of prompt + answer computes every position anew."""
    loaded, inputs = family.loaded, family.inputs
    ids = inputs["input_ids"][0]
    settings = PruneSettings(method="random", k=8, layer=2, seed=3)
    steps = 6
    with torch.inference_mode(), tiny_models.pruned_by(loaded.model, plan_for(loaded, ids, settings)):
        generated = loaded.model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    sequence = generated.sequences
    whole = dict(inputs, input_ids=sequence, attention_mask=torch.ones_like(sequence))
    if "mm_token_type_ids" in inputs:
        whole["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, steps))
    scratch = logits(loaded, whole, plan_for(loaded, sequence[0], settings))
    for step in range(1, steps):
        assert torch.allclose(generated.logits[step][0], scratch[0, -(steps - step) - 1], atol=1e-4)


def test_kept_tokens_keep_their_original_3d_positions(families):
    """Qwen2.5-VL: pruning before the language model equals transformers' own model fed only the
    kept embeddings, at the (time, height, width) positions get_rope_index gave them in the
    whole prompt."""
    qwen = families["qwen2.5-vl"]
    inputs, loaded, reference = qwen.inputs, qwen.loaded, qwen.reference
    ids = inputs["input_ids"][0]
    pruning = plan_for(loaded, ids, PruneSettings(method="divprune", k=8))
    pruned, done = pruned_logits(loaded, inputs, pruning)
    with torch.inference_mode():
        model = reference.model
        positions, _ = model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )  # fmt: skip
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        embeds[inputs["input_ids"] == loaded.image_token_id] = features
        (first_start, first_end), (second_start, second_end) = image_spans(ids, loaded.image_token_id)
        keep = torch.cat([
            torch.arange(first_start), done.pruned()[0].kept, torch.arange(first_end, second_start), done.pruned()[1].kept,
            torch.arange(second_end, ids.numel()),
        ])  # fmt: skip
        assert not torch.equal(positions[1, 0, keep], positions[2, 0, keep])  # height and width differ: 3-D
        expected = reference(inputs_embeds=embeds[:, keep], position_ids=positions[..., keep]).logits
    assert torch.allclose(pruned, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["vanilla", "asap", "divprune"])
def test_a_qwen_batch_equals_its_samples_one_by_one(families, images, method):
    """Two rows of different lengths and image sizes: each row its own 3-D positions and rope
    deltas, its own k tokens; decoding continues per row."""
    qwen = families["qwen2.5-vl"]
    loaded, tokenizer = qwen.loaded, qwen.loaded.processor.tokenizer
    samples = [([images[0]], "what is it?"), ([images[1]], "where is the blue thing in this picture?")]
    batch = tiny_models.qwen_batch(tokenizer, samples)
    settings = PruneSettings(method=method, k=8)
    steps = 5
    options = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False, "output_logits": True,
               "return_dict_in_generate": True}  # fmt: skip
    with (
        torch.inference_mode(),
        tiny_models.pruned_by(loaded.model, [plan_for(loaded, row, settings) for row in batch["input_ids"]]),
    ):
        batched = loaded.model.generate(**batch, **options)
    for row, sample in enumerate(samples):
        single = tiny_models.qwen_batch(tokenizer, [sample])
        with (
            torch.inference_mode(),
            tiny_models.pruned_by(loaded.model, plan_for(loaded, single["input_ids"][0], settings)),
        ):
            alone = loaded.model.generate(**single, **options)
        for step in range(steps):
            assert torch.allclose(batched.logits[step][row], alone.logits[step][0], atol=1e-5)


def test_decoding_after_pruning_reports_what_was_kept(family):
    result = generate(family.loaded, family.inputs, PruneSettings(method="asap", k=8), max_tokens=4)
    visual = sum(end - start for start, end in image_spans(family.inputs["input_ids"][0], family.loaded.image_token_id))
    assert (result.visual_tokens, result.kept_tokens) == (visual, 16)
    assert result.generated_tokens >= 1 and result.flops_ratio < 1


TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300}  # fmt: skip
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 16, "patch_size": 4}  # fmt: skip


def test_sliding_window_layers_are_refused_by_name():
    config = Gemma3Config(vision_config=TINY_VISION, text_config=TINY_TEXT, image_token_id=299, mm_tokens_per_image=4)
    gemma3 = Gemma3ForConditionalGeneration(config)
    with pytest.raises(UnsupportedModel, match="sliding_attention layers"):
        install(gemma3)
    assert not isinstance(gemma3.get_decoder(), PrunedDecoder)  # refused before anything changed


def test_a_model_that_masks_its_own_image_attention_fails_clearly():
    """PaliGemma attends bidirectionally over its image and prompt prefix: its language model
    receives a ready-made 4-D mask, which the engine refuses instead of pruning wrongly."""
    config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", **TINY_VISION},
        text_config={"model_type": "gemma", **TINY_TEXT},
        image_token_id=299,
        projection_dim=64,
    )
    paligemma = PaliGemmaForConditionalGeneration(config).eval()
    check_supported(paligemma)  # its structure is fine; its masks are not
    install(paligemma)
    ids = torch.tensor([[299] * 16 + [5, 6, 7]])
    with pytest.raises(UnsupportedModel, match="builds its own attention masks"):
        paligemma(input_ids=ids, pixel_values=torch.zeros(1, 3, 16, 16), token_type_ids=torch.zeros_like(ids))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_asap_run_says_what_these_processors_need(families, image_file, asap):
    result = asap("run", image_file, "what?", "-m", families["internvl"].path)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot load model") and "torchvision" in lines[0]


# A LLaVA around each text family whose attention can slide (or is soft-capped): the options that
# make it attend otherwise than fully and causally, which the engine does not reproduce.
WINDOWED = {
    "mistral": {"sliding_window": 8},
    "mixtral": {"sliding_window": 8, "num_local_experts": 2, "num_experts_per_tok": 1},
    "phi3": {"sliding_window": 8, "pad_token_id": 0},
    "starcoder2": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
    "qwen3": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
    "gemma2": {"sliding_window": 8},
    "gemma2-softcap": {"layer_types": ["full_attention"] * 2, "attn_logit_softcapping": 50.0},
}
LLAVA_TEXT = {key: value for key, value in TINY_TEXT.items() if key != "vocab_size"} | {
    "vocab_size": 320,
    "max_position_embeddings": 256,
}


def tiny_llava(text_type: str, **text_options):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **TINY_VISION, "projection_dim": 32},
        text_config={"model_type": text_type.split("-")[0], **LLAVA_TEXT, **text_options},
        image_token_id=300,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("family", list(WINDOWED))
def test_every_family_with_windowed_or_capped_attention_is_refused(family):
    model = tiny_llava(family, **WINDOWED[family])
    with pytest.raises(UnsupportedModel, match="sliding|softcapping"):
        install(model)
    assert not isinstance(model.get_decoder(), PrunedDecoder)


def test_qwen2_5_vl_with_sliding_window_is_refused(families):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = families["qwen2.5-vl"].reference.config
    text = config.get_text_config()
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, 8, 0
    with pytest.raises(UnsupportedModel, match="sliding"):
        check_supported(Qwen2_5_VLForConditionalGeneration(config))


@pytest.mark.parametrize("window", [None, 256])  # no window, or one as long as the whole context
def test_mistral_without_a_window_that_cuts_runs_and_equals_transformers(window):
    ids = torch.tensor([[1] + [300] * 16 + list(range(5, 45))])  # 57 tokens: an 8-token window would cut
    pixels = torch.rand(1, 3, 16, 16)
    reference = tiny_llava("mistral", sliding_window=window)
    with torch.inference_mode():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        windowed = tiny_llava("mistral", sliding_window=8)(input_ids=ids, pixel_values=pixels).logits
    assert not torch.allclose(windowed, expected, atol=1e-3)  # why a window that cuts is refused
    loaded = prepare(tiny_llava("mistral", sliding_window=window), SimpleNamespace(), "mistral")
    with torch.inference_mode():
        got = loaded.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_processor_that_needs_torchvision_says_so_in_one_line(families, tmp_path, asap):
    """transformers builds Qwen2.5-VL's processor with a video processor, which needs torchvision."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the processor loads")
    from PIL import Image

    image = tmp_path / "picture.png"
    Image.new("RGB", (16, 16)).save(image)
    result = asap("run", image, "hi", "-m", families["qwen2.5-vl"].path)
    assert result.exit_code == 1
    path = families["qwen2.5-vl"].path
    assert result.stderr == (
        f"Error: cannot load model '{path}': its processor needs torchvision, which is not installed; "
        'pip install torchvision (for Qwen2.5-VL and InternVL: pip install "asapcli[torchvision]")\n'
    )
