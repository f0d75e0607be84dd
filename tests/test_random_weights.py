"""--random-weights: a preset's architecture built from its [config] table with random weights,
in the target dtype on the target device, no float32 copy; --layers N and its labels; the
refusals. Tiny preset-like architectures go through the real path (a preset file, load(), the
CLI); the paper-scale presets are built on the meta device (no memory) to check their shapes."""

import importlib.util
import json
import tomllib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

from asapcli.engine import image_spans
from asapcli.runtime import presets
from asapcli.runtime.inputs import build_inputs, pattern_image, user_message
from asapcli.runtime.loading import load
from asapcli.runtime.random_model import made_in, random_config

PROFILES = Path(presets.__file__).resolve().parents[2] / "profiles"

# LLaVA-1.5 and LLaVA-NeXT in miniature, written as the real presets are: a hub id (so that
# --random-weights is asked for), [architecture] and the checkpoint's [config].
TEXT = """
[config.text_config]
model_type = "llama"
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 300
max_position_embeddings = 1024

[config.vision_config]
model_type = "clip_vision_model"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
image_size = 32
patch_size = 4
projection_dim = 32
"""
TINY_PRESETS = {
    "tiny-llava": f"""
hub_id = "nobody/tiny-llava"
description = "tiny"
[architecture]
layers = 4
hidden = 64
intermediate = 128
heads = 4
kv_heads = 2
visual_tokens = 64
[defaults]
layer = 2
k = 16
[config]
model_type = "llava"
vision_feature_layer = -1
vision_feature_select_strategy = "default"
{TEXT}""",
    "tiny-next": f"""
hub_id = "nobody/tiny-next"
description = "tiny"
[architecture]
layers = 4
hidden = 64
intermediate = 128
heads = 4
kv_heads = 2
visual_tokens = 336
[defaults]
layer = 2
k = 32
pattern = [64, 64]
[config]
model_type = "llava_next"
vision_feature_layer = -1
vision_feature_select_strategy = "default"
image_grid_pinpoints = [[32, 64], [64, 32], [64, 64]]
{TEXT}""",
    # InternVL and Qwen2.5-VL in miniature (tests/tiny_models.py's shapes): 16 tokens per 32 px
    # tile, up to 4 tiles and a thumbnail; 4 px patches merged 2 x 2.
    "tiny-internvl": """
description = "tiny"
[architecture]
layers = 4
hidden = 64
intermediate = 128
heads = 4
kv_heads = 2
visual_tokens = 48
[defaults]
layer = 2
k = 8
pattern = [64, 32]
[config]
model_type = "internvl"
downsample_ratio = 0.5
vision_feature_layer = -1
[config.text_config]
model_type = "llama"
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 2048
[config.vision_config]
model_type = "internvl_vision"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
image_size = [32, 32]
patch_size = [4, 4]
[processor]
max_patches = 4
""",
    "tiny-qwen": """
description = "tiny"
[architecture]
layers = 4
hidden = 64
intermediate = 128
heads = 4
kv_heads = 2
visual_tokens = 16
[defaults]
layer = 2
k = 8
pattern = [32, 32]
[config]
model_type = "qwen2_5_vl"
[config.text_config]
model_type = "qwen2_5_vl_text"
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 2048
rope_parameters = { rope_type = "default", rope_theta = 10000.0, mrope_section = [2, 3, 3] }
[config.vision_config]
depth = 2
hidden_size = 32
intermediate_size = 64
num_heads = 2
out_hidden_size = 64
patch_size = 4
spatial_merge_size = 2
temporal_patch_size = 2
window_size = 16
fullatt_block_indexes = [1]
[processor]
min_pixels = 256
max_pixels = 4096
""",
    "tiny-no-config": """
description = "numbers only"
[architecture]
layers = 4
hidden = 64
intermediate = 128
heads = 4
kv_heads = 2
visual_tokens = 64
""",
}


@pytest.fixture
def tiny_presets(tmp_path, monkeypatch):
    """A profiles folder holding the tiny presets beside the real ones, read by find_preset."""
    for entry in PROFILES.glob("*.toml"):
        (tmp_path / entry.name).write_text(entry.read_text())
    for name, text in TINY_PRESETS.items():
        (tmp_path / f"{name}.toml").write_text(text)
    monkeypatch.setattr(presets, "_profiles", lambda: tmp_path)
    return tmp_path


class AllocatedDtypes(TorchDispatchMode):
    """Records the dtype and size of every tensor an operation makes."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.made.append((tensor.dtype, tensor.numel()))
        return result


def test_the_built_model_is_the_presets_shape_in_the_target_dtype_with_no_float32_tensor(tiny_presets):
    with AllocatedDtypes() as record:
        loaded = load("tiny-llava", device="cpu", dtype="bfloat16", random_weights=True)
    text = loaded.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (4, 64, 128)
    attention = loaded.decoder.decoder.layers[0].self_attn
    assert attention.q_proj.out_features == 4 * attention.head_dim and attention.k_proj.out_features == 2 * 16
    assert loaded.model.get_input_embeddings().num_embeddings == 300  # the config's vocabulary
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    # Every weight-sized tensor made on the way was bfloat16: none was made in float32 first
    # (RoPE's inverse frequencies, 8 numbers, are float32 by design).
    made_in_float32 = [numel for dtype, numel in record.made if dtype == torch.float32]
    assert made_in_float32 and max(made_in_float32) < 32  # the smallest weight here has 32
    assert sum(numel for dtype, numel in record.made if dtype == torch.bfloat16) >= sum(
        p.numel() for p in loaded.model.parameters()
    )
    inputs = build_inputs(loaded.processor, [user_message("what is it?", 1)], [pattern_image(32)])
    ((start, end),) = image_spans(inputs["input_ids"][0], loaded.image_token_id)
    assert end - start == 64  # (32 / 4)^2 visual tokens per image, as [architecture] says
    assert loaded.random_weights and loaded.label == "tiny-llava (random weights)"


def test_the_build_is_seeded_and_made_on_the_target_device(tiny_presets):
    first, second = (load("tiny-llava", device="cpu", random_weights=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True))
    table = tomllib.loads(TINY_PRESETS["tiny-llava"])["config"]
    config, _ = random_config(table)
    with made_in(torch.float16, "meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float16)}


def test_layers_cuts_the_language_model_and_every_output_says_so(tiny_presets, asap):
    loaded = load("tiny-llava", device="cpu", random_weights=True, layers=3)
    assert len(loaded.decoder.decoder.layers) == 3 and loaded.num_layers == 3
    assert loaded.label == "tiny-llava (random weights, first 3 of 4 layers)"

    fast = ["--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--methods", "vanilla"]
    args = ["profile", "-m", "tiny-llava", "--random-weights", "--layers", 3, *fast]
    result = asap(*args, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(row["random_weights"], row["decoder_layers"], row["decoder_layers_full"]) for row in rows} == {
        (True, 3, 4)
    }
    assert rows[0]["visual_tokens"] == 64
    table = asap(*args)
    assert "tiny-llava (random weights, first 3 of 4 layers): prefill" in " ".join(table.stdout.split())
    assert "first 3 of 4 decoder layers (--layers)" in table.stdout

    flops = asap("flops", "-m", "tiny-llava", "--random-weights", "--layers", 3, "--measure", "-k", 16, "--json")
    assert flops.exit_code == 0, flops.output
    report = json.loads(flops.stdout)
    assert (report["random_weights"], report["decoder_layers"], report["decoder_layers_full"]) == (True, 3, 4)
    assert report["architecture"]["layers"] == 3
    # fvcore counted the 3 layers that were built, and Eq. 7 counts the same 3 layers.
    assert report["measured"]["tflops_vanilla"] == pytest.approx(report["tflops_vanilla"])
    table = asap("flops", "-m", "tiny-llava", "--random-weights", "--layers", 3, "--measure", "-k", 16)
    assert "tiny-llava (random weights, first 3 of 4 layers): FLOPs" in " ".join(table.stdout.split())


def test_a_whole_model_is_labelled_as_whole(tiny_presets, asap):
    assert load("tiny-llava", device="cpu", random_weights=True, layers=4).label == "tiny-llava (random weights)"
    checkpoint = json.loads(asap("flops", "-m", "llava-1.5-7b", "--json").stdout)
    labels = checkpoint["random_weights"], checkpoint["decoder_layers"], checkpoint["decoder_layers_full"]
    assert labels == (False, 32, 32)


def test_llava_next_tiles_the_presets_pattern(tiny_presets, asap):
    fast = ["--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--methods", "vanilla", "--json"]
    result = asap("profile", "-m", "tiny-next", "--random-weights", *fast)
    assert result.exit_code == 0, result.output
    # A 64 px square on 32 px tiles: the 8 x 8 base image, then 2 x 2 tiles (16 x 16 features)
    # with a newline slot after each row: 64 + 16 x 17 = 336, the preset's visual_tokens.
    assert json.loads(result.stdout)["visual_tokens"] == 336


def test_run_answers_with_random_weights(tiny_presets, image_file, asap):
    result = asap("run", image_file, "what is it?", "-m", "tiny-llava", "--random-weights", "--json", "--max-tokens", 3)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["visual_tokens"] == 64 and answer["kept_tokens"] == 16
    # run, compare and chat said nothing of it: every command that loads one says so now
    assert "tiny-llava (random weights): its answers mean nothing" in result.stderr
    result = asap("run", image_file, "what?", "-m", "tiny-llava", "--random-weights", "--layers", 1, "--max-tokens", 1)
    assert result.exit_code == 2 and "this model has 1 decoder layer, so none to prune after" in result.stderr
    assert "its answers mean nothing" not in result.stderr  # refused before the model was built
    wide = ["-m", "tiny-llava", "--random-weights", "--layer", "9", "--repeats", "1", "--methods", "asap"]
    result = asap("profile", *wide)  # the preset's own depth (4) is known before building too
    assert result.exit_code == 2 and "layer must be in 1..3" in result.stderr
    assert "its answers mean nothing" not in result.stderr
    vanilla = ["--method", "vanilla", "--max-tokens", 1]  # never reads the layer: runs on one layer
    assert (
        asap("run", image_file, "what?", "-m", "tiny-llava", "--random-weights", "--layers", 1, *vanilla).exit_code == 0
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "tiny-no-config", "--random-weights"], "has no [config] table"),
        (["-m", "demo", "--random-weights"], "has no [config] table"),
        (["-m", "someone/some-model", "--random-weights"], "is a folder or hub id"),
        (["-m", "tiny-llava", "--layers", "2"], "--layers cuts a model built with --random-weights"),
        (["-m", "tiny-llava", "--random-weights", "--layers", "5"], "--layers must be in 1..4"),
        (["-m", "tiny-llava", "--random-weights", "--device-map", "auto"], "is built from numbers on one device"),
    ],
)
def test_refusals_are_one_line(tiny_presets, image_file, args, message, asap):
    result = asap("run", image_file, "hi", *args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_a_folder_is_refused_and_eval_and_flops_without_measure_refuse(tiny_presets, llava_path, asap):
    result = asap("profile", "-m", llava_path, "--random-weights")
    assert result.exit_code == 2 and "is a folder or hub id" in result.stderr
    result = asap("eval", "-m", "tiny-llava", "--random-weights", "-n", 2)
    assert result.exit_code == 2 and "answers at chance" in result.stderr
    result = asap("flops", "-m", "tiny-llava", "--random-weights")
    assert result.exit_code == 2 and "add --measure" in result.stderr


@pytest.mark.parametrize("name", ["tiny-internvl", "tiny-qwen"])
def test_internvl_and_qwen_build_and_profile_or_say_they_need_torchvision(tiny_presets, name, asap):
    """Their processors need torchvision (there on a GPU machine, not on this project's CPU
    one): with it, a profile of the preset's shape; without it, one Error line, before any build."""
    fast = ["--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--methods", "vanilla,asap", "--json"]
    result = asap("profile", "-m", name, "--random-weights", *fast)
    if importlib.util.find_spec("torchvision") is None:
        assert result.exit_code == 1 and "its processor needs torchvision" in result.stderr
        return
    assert result.exit_code == 0, result.output
    vanilla, pruned = (json.loads(line) for line in result.stdout.splitlines())
    tokens = presets.get_preset(name).architecture.visual_tokens
    assert vanilla["visual_tokens"] == tokens and pruned["kept_tokens"] == 8 and pruned["random_weights"]


# The paper's shapes, built on the meta device: the real presets' [config] tables against their
# [architecture] numbers (parameter counts as published: LLaVA-1.5-7B 7.06 B, LLaVA-NeXT-7B
# 7.06 B, LLaVA-1.5-13B 13.35 B, InternVL2.5-8B 8.08 B, Qwen2.5-VL-7B 8.29 B).
PAPER_SCALE = {
    "llava-1.5-7b": 7.06,
    "llava-next-7b": 7.06,
    "llava-1.5-13b": 13.35,
    "internvl2.5-8b": 8.08,
    "qwen2.5-vl-7b": 8.29,
}


@pytest.mark.parametrize("name", PAPER_SCALE)
def test_each_paper_scale_preset_builds_its_architecture(name):
    preset = presets.get_preset(name)
    arch = preset.architecture
    config, _ = random_config(preset.config)
    with made_in(torch.bfloat16, "meta"):
        model = AutoModelForImageTextToText.from_config(config)
    decoder = model.get_decoder()
    layer = decoder.layers[0]
    head_dim = layer.self_attn.head_dim
    assert len(decoder.layers) == arch.layers
    assert decoder.embed_tokens.embedding_dim == arch.hidden
    assert layer.mlp.up_proj.out_features == arch.intermediate
    assert layer.self_attn.q_proj.out_features == arch.heads * head_dim == arch.hidden
    assert layer.self_attn.k_proj.out_features == arch.kv_heads * head_dim
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert params == pytest.approx(PAPER_SCALE[name], abs=0.03)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-7b", "internvl2.5-8b", "qwen2.5-vl-7b"])
def test_each_presets_pattern_makes_its_visual_tokens(name):
    """The built-in test pattern, through the family's image processor, makes the preset's visual
    tokens: the shapes of the paper's Table 4 (LLaVA-NeXT: 2,880 features + 48 newline slots)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from asapcli.runtime.random_model import char_tokenizer, family_processor

    preset = presets.get_preset(name)
    config, tokenizer = random_config(preset.config)
    picture = pattern_image(*preset.pattern)
    if config.model_type == "internvl":  # its processor needs torchvision; its image processor does not
        tiles = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, **preset.processor)
        tokens = int(tiles(images=[picture])["num_patches"][0]) * 256
    elif config.model_type == "qwen2_5_vl":
        grid = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, **preset.processor)(images=[picture])
        tokens = int(grid["image_grid_thw"][0].prod()) // 4
    else:
        processor = family_processor(config, tokenizer or char_tokenizer(), preset.processor or {})
        inputs = build_inputs(processor, [user_message("what is it?", 1)], [picture])
        ((start, end),) = image_spans(inputs["input_ids"][0], config.image_token_id)
        tokens = end - start
    newlines = 48 if name == "llava-next-7b" else 0
    assert tokens == preset.architecture.visual_tokens + newlines
