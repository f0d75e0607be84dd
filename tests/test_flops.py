"""Eq. 7-8 against hand-computed numbers, and `asap flops` through the CLI."""

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from asapcli.engine import cost as flops
from asapcli.errors import UsageError


def test_layer_flops_is_the_papers_formula():
    # v=2, d=3, m=5: 4*2*9 + 2*4*3 + 3*2*3*5 = 72 + 24 + 90
    assert flops.layer_flops(2, 3, 5) == 186
    # GQA with half the kv heads: 2*2*9*(1 + 0.5) = 54 instead of 72
    assert flops.layer_flops(2, 3, 5, kv_fraction=0.5) == 168


def test_llava_1_5_7b_vanilla_and_pruned_match_the_paper():
    vanilla = flops.schedule_flops([flops.Stage(32, 576)], 4096, 11008)
    assert vanilla / 1e12 == pytest.approx(3.817, abs=5e-4)  # paper Table 1 / 4
    before_first_layer = flops.pruning_schedule(32, 576, [(0, 128)])
    assert flops.schedule_flops(before_first_layer, 4096, 11008) / 1e12 == pytest.approx(0.833, abs=5e-4)


def test_schedules_and_the_ratio_eq_8():
    stages = flops.pruning_schedule(10, 100, [(2, 50), (6, 20)])
    assert stages == [flops.Stage(2, 100), flops.Stage(4, 50), flops.Stage(4, 20)]
    expected = (
        2 * flops.layer_flops(100, 8, 16) + 4 * flops.layer_flops(50, 8, 16) + 4 * flops.layer_flops(20, 8, 16)
    ) / (10 * flops.layer_flops(100, 8, 16))
    config = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=10)
    assert flops.visual_flops(config, 100, [(2, 50), (6, 20)]).ratio == pytest.approx(expected)
    assert flops.single_prune(10, 100, 500, 2) == [flops.Stage(10, 100)]  # k >= v: nothing pruned


@pytest.mark.parametrize(
    "steps, message",
    [([(2, 50), (4, 80)], "must not grow"), ([(11, 5)], "outside"), ([(2, 0)], "at least 1")],
)
def test_bad_schedules_are_usage_errors(steps, message):
    with pytest.raises(UsageError, match=message):
        flops.pruning_schedule(10, 100, steps)


def test_parse_schedule():
    assert flops.parse_schedule("2:960, 16:480") == [(2, 960), (16, 480)]
    with pytest.raises(UsageError):
        flops.parse_schedule("2-960")


def test_flops_cli_table_and_json(asap):
    counted = json.loads(asap("flops", "-m", "llava-1.5-7b", "--k", "128", "--layer", "2", "--json").stdout)
    assert (round(counted["tflops_vanilla"], 3), round(counted["flops_ratio"], 4)) == (3.817, 0.2671)
    result = asap("flops", "-m", "llava-1.5-7b", "--k", "128", "--layer", "2")  # the table shows the record's figures
    assert result.exit_code == 0, result.output
    assert "3.817" in result.stdout and "26.71%" in result.stdout and "multiply-accumulates" in result.stdout
    result = asap("flops", "-m", "llava-next-7b", "--schedule", "2:960,16:480", "--json")
    data = json.loads(result.stdout)
    assert data["tflops_vanilla"] == pytest.approx(20.825, abs=5e-3)  # paper Table 2
    assert [s["tokens"] for s in data["stages"]] == [2880, 960, 480]
    assert data["flops_ratio"] == pytest.approx(data["tflops"] / data["tflops_vanilla"])
    assert "visual tokens only" in data["convention"]


def test_flops_takes_several_budgets_as_profile_and_eval_do(asap):
    args = ["flops", "-m", "llava-1.5-7b", "-k", "192,128,64", "--layer", "2"]
    records = [json.loads(line) for line in asap(*args, "--json").stdout.splitlines()]
    assert [(r["k"], r["layer"]) for r in records] == [(192, 2), (128, 2), (64, 2)]
    alone = [json.loads(asap("flops", "-m", "llava-1.5-7b", "-k", k, "--json").stdout) for k in ["192", "128", "64"]]

    def counted(record):  # the environment's load average moves between runs
        return {key: value for key, value in record.items() if key != "environment"}

    assert [counted(r) for r in records] == [counted(r) for r in alone]  # each budget counted as it is alone
    table = asap(*args).stdout.splitlines()
    rows = [line.split() for line in table if line.split() and line.split()[0] in ("vanilla", "192", "128", "64")]
    assert rows == [
        ["vanilla", "576", "3.817", "100.0", "288.00"],  # KV: 32 layers x 576 tokens x 16 KiB
        ["192", "2", "192", "1.413", "37.0", "108.00"],  # layers 0..1 whole, 30 at 192
        ["128", "2", "128", "1.020", "26.7", "78.00"],
        ["64", "2", "64", "0.628", "16.5", "48.00"],
    ]
    csv_rows = list(csv.DictReader(io.StringIO(asap(*args, "--format", "csv").stdout)))
    (one,) = csv.DictReader(io.StringIO(asap("flops", "-m", "llava-1.5-7b", "-k", "128", "--format", "csv").stdout))
    assert list(csv_rows[0]) == list(one)  # the records' fields: more budgets, more rows, same columns
    assert [row["k"] for row in csv_rows] == ["192", "128", "64"] and float(one["flops_ratio"]) == records[1][
        "flops_ratio"
    ]
    assert {**csv_rows[1], "environment.date": ""} == {**one, "environment.date": ""}
    twice = asap("flops", "-m", "llava-1.5-7b", "-k", "128,128", "--json").stdout.splitlines()
    assert len(twice) == 1  # a budget given twice is counted once, as a method is
    schedule = json.loads(asap("flops", "-m", "llava-next-7b", "--schedule", "2:960", "--json").stdout)
    assert (schedule["k"], schedule["layer"]) == (None, None)


@pytest.mark.parametrize(
    "preset, stages", [("llava-next-7b", [(2, 2880), (30, 640)]), ("qwen2.5-vl-7b", [(2, 1024), (26, 224)])]
)
def test_flops_takes_k_and_layer_from_the_preset(preset, stages, asap):
    data = json.loads(asap("flops", "-m", preset, "--json").stdout)
    assert [(stage["layers"], stage["tokens"]) for stage in data["stages"]] == stages


def test_flops_from_a_local_config(llava_path, asap):
    result = asap("flops", "-m", llava_path, "--k", "16", "--layer", "1", "--json", "--gqa")
    data = json.loads(result.stdout)
    assert data["architecture"] == {
        "layers": 4,
        "hidden": 64,
        "intermediate": 128,
        "heads": 4,
        "kv_heads": 2,
        "visual_tokens": 64,
    }
    expected = flops.layer_flops(64, 64, 128, 0.5) + 3 * flops.layer_flops(16, 64, 128, 0.5)
    assert data["tflops"] * 1e12 == pytest.approx(expected)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["-m", "llava-1.5-7b", "--schedule", "2:100,4:200"], "must not grow"),
        (["-m", "llava-1.5-7b", "--schedule", "40:100"], "outside this model's layers 0..31"),
        (["-m", "llava-1.5-7b", "--k", "0"], "k needs a whole number of at least 1, got '0'"),
        (["-m", "llava-1.5-7b", "-k", "128,64", "--schedule", "2:9"], "give either --schedule or -k/--layer"),
        # Steps that prune nothing, refused instead of shown as stages:
        (["-m", "llava-1.5-7b", "--schedule", "2:100000"], "keeps every visual token (the image has 576)"),
        (["-m", "llava-1.5-7b", "--schedule", "2:576"], "keeps every visual token"),
        (["-m", "llava-1.5-7b", "--schedule", "2:300,8:300"], "keeps the 300 tokens the step before left"),
        (["-m", "llava-1.5-7b", "--schedule", "32:100"], "after the last layer, prunes nothing"),
        (["-m", "llava-1.5-7b", "--layer", "32"], "after the last layer, prunes nothing"),
        (["-m", "llava-1.5-7b", "-k", "600"], "-k 600 keeps all 576 visual tokens of llava-1.5-7b: it prunes nothing"),
        (["-m", "llava-1.5-7b", "--schedule", ""], "--schedule is empty"),
        (["-m", "llava-1.5-7b", "--schedule", " , "], "bad schedule item"),
        (["-m", "llava-1.5-7b", "--schedule", "2:1\N{SUPERSCRIPT TWO}"], "bad schedule item"),
        (["-m", "llava-1.5-7b", "--measure", "--method", "magic"], "'magic' is not one of"),
        (["-m", "llava-1.5-7b", "--method", "vanilla"], "--method vanilla prunes nothing"),
        (["-m", "./no-such-folder"], "model folder './no-such-folder' not found"),  # not read as a hub id
        (["-m", "llava-1.5-7b", "--layer", "-1"], "layer must be at least 0"),
    ],
)
def test_flops_errors(args, message, asap):
    result = asap("flops", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and message in result.stderr


@pytest.mark.parametrize("method", ["vanilla", "fastv", "asap"])
def test_fvcore_counts_eq_7_exactly_on_the_tiny_model(llava_path, method):
    from asapcli.engine.settings import PruneSettings
    from asapcli.measure.measured_flops import count_flops
    from asapcli.runtime.loading import load

    loaded = load(str(llava_path), device="cpu")
    k, layer = 16, 2
    settings = None if method == "vanilla" else PruneSettings(method=method, k=k, layer=layer)
    counted = count_flops(loaded, 64, settings)
    # The tiny model is grouped-query (4 query heads, 2 key/value heads): k/v projections at half size.
    dense, pruned = flops.layer_flops(64, 64, 128, 0.5), flops.layer_flops(k, 64, 128, 0.5)
    expected = [dense] * 4 if method == "vanilla" else [dense, dense, pruned, pruned]
    assert counted.per_layer == expected
    # Scoring ops, counted apart: FastV's last row against 64 keys; ASAP adds the mass of 2 layers.
    scoring = {"vanilla": {}, "fastv": {"matmul": 64 * 64}, "asap": {"matmul": 64 * 64, "einsum": 2 * 64 * 64}}
    assert counted.other == scoring[method]


def test_flops_measure_through_the_cli(llava_path, asap):
    result = asap("flops", "-m", llava_path, "-k", "16", "--measure", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["measured"]["tflops"] == pytest.approx(data["tflops"], rel=1e-12)
    assert data["measured"]["tflops_vanilla"] == pytest.approx(data["tflops_vanilla"], rel=1e-12)
    assert data["measured"]["stages_tflops"] == pytest.approx([s["tflops"] for s in data["stages"]], rel=1e-12)
    assert "grouped-query" in data["convention"]
    table = asap("flops", "-m", llava_path, "-k", "16", "--measure")
    assert "measured MFLOPs" in table.stdout and "fvcore" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--schedule", "1:32,2:16"], "--measure runs one pruning step"),
        (["--layer", "0"], "layer must be at least 1"),
        (["--layer", "4"], "layer must be in 1..3"),
    ],
)
def test_flops_measure_errors(llava_path, args, message, asap):
    result = asap("flops", "-m", llava_path, "--measure", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and message in result.stderr


@pytest.mark.parametrize("method", ["divprune", "pool"])
@pytest.mark.parametrize("budget", [["-k", "12"], ["-k", "12", "--layer", "2"], ["--schedule", "2:12"]])
def test_flops_measure_of_a_method_before_the_llm_prunes_layer_0_in_both_columns(llava_path, method, budget, asap):
    """Whichever way the budget is given, the formula counts what the measured method does:
    pruning before layer 0, and pool keeping its largest square grid (9 of 12)."""
    args = ["flops", "-m", str(llava_path), *budget, "--measure", "--method", method, "--json"]
    result = asap(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    kept = {"divprune": 12, "pool": 9}[method]
    assert [(stage["layers"], stage["tokens"]) for stage in data["stages"]] == [(4, kept)]
    assert data["measured"]["stages_tflops"] == pytest.approx([s["tflops"] for s in data["stages"]], rel=1e-12)
    assert data["measured"]["tflops"] == pytest.approx(data["tflops"], rel=1e-12)
    table = asap(*args[:-1]).stdout
    scoring = {"divprune": "none.", "pool": "adaptive_avg_pool2d 4,096 FLOPs."}[method]  # not "none FLOPs"
    assert f"counted apart: {scoring}" in table


def test_gqa_on_a_multi_head_model_says_it_changes_nothing(asap):
    result = asap("flops", "-m", "llava-1.5-7b", "--gqa")
    assert result.exit_code == 0, result.output
    assert "--gqa changes nothing here: llava-1.5-7b has as many key/value heads as query heads." in result.stderr


def test_the_formula_counts_what_the_named_method_does_with_or_without_measure(asap):
    """--method pool once changed the formula only with --measure (62.12% without, 20.86% with)."""
    alone = json.loads(asap("flops", "--method", "pool", "-k", "192", "--json").stdout)
    assert (alone["layer"], [stage["tokens"] for stage in alone["stages"]]) == (0, [169])  # 13 x 13, before layer 0
    measured = json.loads(asap("flops", "--method", "pool", "-k", "192", "--measure", "--json").stdout)
    assert measured["flops_ratio"] == pytest.approx(alone["flops_ratio"])


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_a_budgets_table_of_a_method_in_stages_lists_each_step(method, asap):
    """Several -k of a method that prunes in stages: a row per budget, its layers and tokens step by
    step, the same as each budget's JSON (it failed with `too many values to unpack`)."""
    table = asap("flops", "-m", "llava-1.5-7b", "--method", method, "-k", "64,128")
    assert table.exit_code == 0, table.output
    records = [
        json.loads(line)
        for line in asap(
            "flops", "-m", "llava-1.5-7b", "--method", method, "-k", "64,128", "--json"
        ).stdout.splitlines()
    ]
    for record in records:
        layers = [sum(stage["layers"] for stage in record["stages"][:i]) for i in range(1, len(record["stages"]))]
        tokens = [stage["tokens"] for stage in record["stages"][1:]]
        row = next(line.split() for line in table.stdout.splitlines() if line.startswith(str(record["k"]) + " "))
        assert row[1:3] == ["/".join(map(str, layers)), "/".join(map(str, tokens))]
        assert row[4] == f"{record['flops_ratio'] * 100:.1f}"


@pytest.mark.parametrize("model", ["qwen2.5-vl-7b", "internvl2.5-8b"])
@pytest.mark.parametrize("method", ["vispruner", "visionzip", "prumerge-plus"])
def test_flops_refuses_a_cls_method_on_a_tower_without_cls(model, method, asap):
    """No figure for a run that cannot happen (it printed 6.09% for qwen2.5-vl-7b's vispruner)."""
    result = asap("flops", "-m", model, "--method", method, "-k", 64)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and "has no [CLS] token" in result.stderr


def test_flops_counts_a_cls_method_on_a_clip_tower_from_its_config(llava_path, asap):
    for model in ("llava-1.5-7b", "llava-next-7b", str(llava_path)):
        result = asap("flops", "-m", model, "--method", "vispruner", "-k", 16, "--json")
        assert result.exit_code == 0, result.output


def test_measure_counts_a_method_in_stages_by_its_own_schedule(asap):
    """sparsevlm's stages were refused as "a --schedule of several" though no --schedule was given."""
    result = asap("flops", "--method", "sparsevlm", "-k", 64, "--measure", "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["stages"]) > 2 and report["measured"]["method"] == "sparsevlm"
    assert report["measured"]["stages_tflops"] == pytest.approx([stage["tflops"] for stage in report["stages"]])


@pytest.mark.parametrize("options", [[], ["--stage-ratio", "0.5"]])
def test_flops_counts_what_run_prunes_with_the_methods_own_options(options, asap):
    """asap flops goes through run's settings: a method's options change what it counts (they could
    not: flops built each method with its defaults), and each count is the run's Eq. 8 ratio."""
    common = ["--method", "pdrop", "-k", "64", *options, "--json"]
    counted = json.loads(asap("flops", *common).stdout)
    car = str(Path(__file__).resolve().parent.parent / "examples" / "car.png")
    answered = asap("run", car, "what colour is the car?", "--max-tokens", 1, "--threads", 1, *common)
    assert answered.exit_code == 0, answered.output
    assert counted["flops_ratio"] == pytest.approx(json.loads(answered.stdout)["flops_ratio"], rel=1e-12)


def test_flops_with_a_stage_ratio_counts_other_stages_than_the_budget_match(asap):
    matched, halved = (
        json.loads(asap("flops", "--method", "pdrop", "-k", "64", *extra, "--json").stdout)
        for extra in ([], ["--stage-ratio", "0.5"])
    )
    assert [stage["tokens"] for stage in halved["stages"]] == [576, 288, 144, 72]
    assert matched["stages"] != halved["stages"] and matched["flops_ratio"] != halved["flops_ratio"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "fastv", "--stage-ratio", "0.5"], "--stage-ratio is not an option of fastv"),
        (["--method", "magic"], "'magic' is not one of"),
    ],
)
def test_flops_refuses_options_as_run_does(args, message, asap):
    result = asap("flops", *args)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "prumerge-plus", "--adaptive", "-k", "64"], "--adaptive keeps each image's own count"),
        (
            ["--method", "visionzip", "--schedule", "1:300,2:100", "--contextual", "5"],
            "--contextual would change nothing",
        ),
        (
            ["--method", "asap", "--schedule", "1:300", "--merge-threshold", "0.5"],
            "--merge-threshold would change nothing",
        ),
        (["--method", "pdrop", "--schedule", "1:300"], "pdrop does not read --schedule"),
        (["-m", "llava-next-7b", "--method", "vispruner", "-k", "4"], "give k at least 5"),
        (["-m", "llava-next-7b", "--method", "visionzip", "-k", "9"], "give k at least 10"),
    ],
)
def test_flops_refuses_what_it_cannot_count_as_run_prunes_it(args, message, asap):
    """A count that was silently not the run's: an image's own count, a schedule that overrides the
    options given, a per-tile budget run refuses (a hostile pass's findings)."""
    result = asap("flops", *args)
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_flops_json_names_the_method_and_its_options(asap):
    record = json.loads(asap("flops", "--method", "pdrop", "--stage-ratio", "0.5", "-k", "64", "--json").stdout)
    assert (record["method"], record["options"]) == ("pdrop", {"stage_ratio": "0.5"})


def test_flops_gives_table_4s_kv_storage_without_weights(asap):
    """The paper's Table 4 (LLaVA-1.5-7B, float16): vanilla 321.39 MB, FastV 129.73 MB at k = 192 and
    97.33 MB at 128, every layer holding the text (about 67 tokens) and the kept visual tokens: a
    compact cache. MB there are MiB (bytes / 2**20). An exact cache keeps layers 0..L-1 whole."""
    args = ["flops", "-m", "llava-1.5-7b", "--method", "fastv", "-k", "192,128", "--text-tokens", 67, "--dtype"]
    lines = asap(*args, "float16", "--kv-cache", "compact", "--json").stdout.splitlines()
    compact = [json.loads(line) for line in lines]
    assert compact[0]["kv_bytes_vanilla"] / 2**20 == pytest.approx(321.39, abs=1)
    assert [r["kv_bytes"] / 2**20 for r in compact] == pytest.approx([129.73, 97.33], abs=1)
    assert all((r["kv_cache"], r["text_tokens"], r["kv_dtype"]) == ("compact", 67, "float16") for r in compact)
    one = ["flops", "-m", "llava-1.5-7b", "--method", "fastv", "-k", 128, "--text-tokens", 67, "--json"]
    exact = json.loads(asap(*one).stdout)
    layer_bytes = 2 * 4096 * 2  # K and V of one token in one layer, 16-bit
    assert exact["kv_bytes"] == (2 * (576 + 67) + 30 * (128 + 67)) * layer_bytes  # layers 0..1 whole
    table = asap(*args, "float32", "--kv-cache", "compact")
    assert table.exit_code == 0, table.output
    assert "KV MiB: the KV cache after the prefill (compact cache, 67 text tokens, float32" in table.stdout
