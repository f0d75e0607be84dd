"""`asap profile` on the tiny model: every column, one JSON object per method and budget, the
KV-cache bytes equal to the cache tensors' own, batch 1 beside batch N, and its errors; the CPU
peak-memory replay."""

import json

import pytest
import torch

from asapcli.engine import METHODS
from asapcli.engine.settings import PruneSettings
from asapcli.measure.profiling import kv_cache_bytes, peak_memory, prefill
from asapcli.report import display
from asapcli.runtime.inputs import build_batch_inputs, build_inputs, pattern_image, user_message
from asapcli.runtime.loading import load

FAST = ["--repeats", "1", "--warmup", "0", "--decode-tokens", "2"]


def table_rows(text: str) -> list[list[str]]:
    """The cells of a rendered table's rows: the lines between its rule and the first blank or
    caption line, split on spaces."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("─")) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or not line[0].isalpha() or line.startswith(("CPU", "TFLOPs", "kept", "peak", "All")):
            break
        rows.append(line.split())
    return rows


def test_profile_table_has_every_column_and_reads_at_80_columns(llava_path, monkeypatch, asap):
    monkeypatch.setattr(display.out, "width", 80)
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, *FAST)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for header in ("method", "kept", "TFLOPs", "FLOPs", "prompt", "KV", "peak", "ms", "time", "tok/s"):
        assert header in text
    rows = table_rows(text)
    assert [row[0] for row in rows] == ["vanilla", "fastv", "asap"]
    assert [row[1:3] for row in rows] == [["-", "64"], ["16", "16"], ["16", "16"]]  # k, kept: whole cells
    assert all(len(line) <= 80 for line in text.splitlines()[: len(rows) + 4]) and "…" not in text
    assert "kept: of 64 visual tokens" in text and "CPU, 1 thread," in text


def test_profile_json_is_one_object_per_method_and_budget(llava_path, asap):
    result = asap("profile", "-m", llava_path, "--methods", "vanilla,random,asap", "-k", "16,8", "--json", *FAST)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["method"], r["k"]) for r in records] == [
        ("vanilla", None),
        ("random", 16),
        ("random", 8),
        ("asap", 16),
        ("asap", 8),
    ]
    prompt = records[0]["prompt_tokens"]
    # 4 layers, 2 key/value heads of 16 dims, float32: keys and values of every cached token.
    per_token_layer = 2 * 2 * 16 * 4
    for record in records:
        kept = record["kept_tokens"]
        assert kept == (64 if record["method"] == "vanilla" else record["k"])
        assert record["kv_cache_bytes"] == per_token_layer * (2 * prompt + 2 * (prompt - 64 + kept))
        assert record["prefill_seconds"] > 0 and record["decode_tokens_per_second"] > 0
        assert record["peak_memory_bytes"] >= record["kv_cache_bytes"]
        assert record["time"] == "cpu_wall" and record["threads"] >= 1
    assert records[0]["flops_ratio"] == 1.0 and records[0]["time_ratio"] == 1.0
    assert records[2]["flops_ratio"] < records[1]["flops_ratio"] < 1.0
    assert records[1]["flops_ratio"] < records[1]["prompt_flops_ratio"] < 1.0  # text tokens are never pruned


def test_profile_takes_every_method(llava_path, asap):
    result = asap("profile", "-m", llava_path, "--methods", ",".join(METHODS), "-k", 16, "--json", *FAST)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["method"] for record in records] == list(METHODS)
    # a multi-stage method's kept tokens are its last stage's (its stages average k over the layers)
    expected = {
        name: method().schedule(64, 16, 2, 4)[-1][1] if method.prunes else 64 for name, method in METHODS.items()
    }
    assert {record["method"]: record["kept_tokens"] for record in records} == expected
    assert expected["fastv"] == 16 and expected["pdrop"] < 16  # one stage keeps k; pdrop's last keeps fewer


def test_kv_cache_bytes_sums_the_cache_tensors(llava_path):
    loaded = load(str(llava_path), device="cpu")
    inputs = build_inputs(loaded.processor, [user_message("hi", 1)], [pattern_image(32)])
    _, cache, _ = prefill(loaded, inputs, PruneSettings(method="fastv", k=10, layer=2))
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    n = inputs["input_ids"].shape[1]
    assert lengths == [n, n, n - 54, n - 54]
    assert kv_cache_bytes(cache) == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_profile_batch_measures_batch_one_beside_batch_n(llava_path, asap):
    result = asap("profile", "-m", llava_path, "--methods", "vanilla,asap", "-k", 16, "--batch", 3, "--json", *FAST)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["method"], r["batch"]) for r in records] == [("vanilla", 1), ("vanilla", 3), ("asap", 1), ("asap", 3)]
    for single, batched in (records[:2], records[2:]):
        assert batched["kept_tokens"] == single["kept_tokens"] and batched["flops_ratio"] == single["flops_ratio"]
        assert batched["kv_cache_bytes"] == 3 * single["kv_cache_bytes"]  # every row keeps its own k tokens
        assert single["throughput_ratio"] == 1.0
        for record in (single, batched):
            assert record["images_per_second"] == pytest.approx(record["batch"] / record["prefill_seconds"])
        assert batched["throughput_ratio"] == pytest.approx(batched["images_per_second"] / single["images_per_second"])
    assert records[1]["time_ratio"] == 1.0  # against vanilla at the same batch size

    table = asap("profile", "-m", llava_path, "-k", 16, "--batch", 2, "--threads", 1, *FAST)
    assert table.exit_code == 0, table.output
    assert "img/s" in table.stdout and "vs 1" in table.stdout and "batch 2: 2 copies" in table.stdout


def test_a_profiling_batch_prefills_each_row_like_the_sample_alone(llava_path):
    loaded = load(str(llava_path), device="cpu")
    settings = PruneSettings(method="asap", k=10, layer=2)
    sample = ("what is it?", pattern_image(32))
    alone, _, _ = prefill(loaded, build_batch_inputs(loaded.processor, [sample]), settings)
    batched, cache, _ = prefill(loaded, build_batch_inputs(loaded.processor, [sample] * 3), settings)
    assert torch.allclose(batched, alone.expand(3, -1), atol=1e-5)
    assert [layer.keys.shape[0] for layer in cache.layers] == [3] * 4


def test_cpu_peak_memory_sees_a_temporary_and_what_is_kept():
    def work():
        temporary = torch.ones(1024, 1024)  # 4 MiB, freed before the end
        kept = temporary.sum(dim=0)  # 4 KiB, returned
        del temporary
        return kept

    peak, kept = peak_memory(torch.device("cpu"), work)
    assert 4 * 2**20 <= peak < 5 * 2**20
    assert kept.shape == (1024,)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "fastv,foo"], "'foo' is not one of vanilla, asap"),
        (["-k", "0"], "k needs a whole number of at least 1"),
        (["-k", "16,x"], "got 'x'"),
        (["--layer", "4"], "layer must be in 1..3"),
        (["--prompt", " "], "the prompt is empty"),
        (["--image", "missing.png"], "image not found"),
        (["--prompt", "hi " * 3000], "the model's context holds"),  # it measured positions past the context
    ],
)
def test_profile_errors_are_one_line(llava_path, args, message, asap):
    result = asap("profile", "-m", llava_path, *args, *FAST)
    assert result.exit_code != 0
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_decoding_past_the_context_is_refused_not_measured(llava_path, asap):
    """--decode-tokens 100000 on a 2048-position model printed nothing for minutes."""
    result = asap("profile", "-m", llava_path, *FAST, "--decode-tokens", 100000)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the prompt is ") and "--decode-tokens asks for 100000 more" in result.stderr


def test_profile_caption_says_where_each_method_pruned(llava_path, asap):
    result = asap(
        "profile", "-m", llava_path, "--methods", "vanilla,vispruner,pdrop,sparsevlm,asap", "-k", 16,
        "--repeats", 1, "--warmup", 0, "--decode-tokens", 2, "--threads", 1,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "prompt tokens;" in line)
    assert "vispruner: before layer 0 (L=0)" in line and "asap: pruned after layer 1 (L=2)" in line
    assert "pdrop, sparsevlm: in stages, the first after layer 0 (L=1)" in line
