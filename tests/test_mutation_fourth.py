"""The second mutation review of this pass: a test for each of its twelve survivors, through the
command line or the API where the option is given."""

import json
import re

import pytest

from asapcli.errors import UsageError

CAR, SHAPES = "examples/car.png", "examples/shapes.png"
QUESTION = "what colour is the car?"


def test_a_flops_share_of_100_percent_keeps_every_token(asap):
    """M02, M04: 100% is a share --flops takes (no pruning); it pruned a token, or was refused."""
    answer = json.loads(asap("run", CAR, QUESTION, "--method", "fastv", "--flops", "100%", "--json").stdout)
    assert (answer["k"], answer["kept_tokens"], answer["flops_ratio"]) == (576, 576, 1.0)


def test_the_share_a_refusal_suggests_is_one_that_runs(asap):
    """M03: the suggestion, followed, is taken (rounded, it was refused again)."""
    for model in ("demo", "llava-1.5-13b"):  # least 50.053%, 5.163%: rounded, 50.05% and 5.16% fall short
        refused = asap("flops", "-m", model, "--method", "fastv", "--flops", "1%")
        (suggested,) = re.findall(r"give --flops ([\d.]+%) or more", refused.stderr)
        taken = asap("flops", "-m", model, "--method", "fastv", "--flops", suggested, "--json")
        assert taken.exit_code == 0, taken.output


def test_a_compact_cache_of_a_method_in_stages_holds_its_first_stage_before_it(asap):
    """M07: the layers before pdrop's first step hold what that step kept, not its last stage."""
    args = ["flops", "-m", "llava-1.5-7b", "--method", "pdrop", "-k", 128, "--kv-cache", "compact", "--json"]
    record = json.loads(asap(*args).stdout)
    stages = [(stage["layers"], stage["tokens"]) for stage in record["stages"]]
    assert stages[0][1] == 576 and len(stages) > 2
    held = [stages[1][1]] * stages[0][0] + [tokens for layers, tokens in stages[1:] for _ in range(layers)]
    assert record["kv_bytes"] == sum(held) * 2 * 4096 * 2


def test_the_command_lines_sampling_options_reach_the_sampler(asap):
    """M09, M11: --top-p 1 is in range; --top-k 1 samples what greedy picks (dropped, it did not)."""
    greedy = json.loads(asap("run", CAR, QUESTION, "--json").stdout)["answer"]
    cut = ["--temperature", 5, "--top-k", 1, "--top-p", 1, "--json"]
    for seed in (3, 4, 5):
        assert json.loads(asap("run", CAR, QUESTION, *cut, "--seed", seed).stdout)["answer"] == greedy
    free = [json.loads(asap("run", CAR, QUESTION, "--temperature", 5, "--seed", s, "--json").stdout) for s in (3, 4, 5)]
    assert any(answer["answer"] != greedy for answer in free)


def test_layer_in_a_comparison_and_at_a_flops_share(asap):
    """M14: a comparison applies L to the methods that read it; M15: at a FLOPs share, eval chooses
    k for the L it runs at, as run does."""
    mixed = asap("eval", "--n", 1, "--methods", "fastv,pdrop", "--layer", 3, "--threads", 1)
    assert mixed.exit_code == 0, mixed.output
    share = ["--flops", "85%", "--layer", 3, "--threads", 1, "--json"]
    (row,) = json.loads(asap("eval", "--n", 1, "--methods", "fastv", *share).stdout)["results"]
    assert row["k"] == json.loads(asap("run", CAR, QUESTION, "--method", "fastv", *share).stdout)["k"]


def test_flops_chooses_k_for_the_visual_tokens_it_is_told(asap):
    """M16: --visual-tokens is the count --flops chooses k for."""
    args = ["flops", "-m", "llava-1.5-7b", "--method", "fastv", "--flops", "50%", "--visual-tokens", 144, "--json"]
    record = json.loads(asap(*args).stdout)
    assert record["architecture"]["visual_tokens"] == 144 and record["k"] < 144 and record["flops_ratio"] <= 0.5


def test_a_batchs_rows_each_get_the_system_prompt(asap):
    """M20: a batch of images dropped --system (a single image kept it)."""
    plain = [json.loads(line) for line in asap("run", CAR, SHAPES, QUESTION, "--json").stdout.splitlines()]
    told = asap("run", CAR, SHAPES, QUESTION, "--system", "Always answer with one word.", "--json")
    rows = [json.loads(line) for line in told.stdout.splitlines()]
    assert all(row["prompt_tokens"] > alone["prompt_tokens"] for row, alone in zip(rows, plain, strict=True))


def test_question_types_of_ones_own_come_in_one_order():
    """M22: types the demo does not know follow their names, not the run's string hashing."""
    from asapcli.measure.questions import in_column_order

    assert in_column_order(["zeta", "position", "alpha", "colour"]) == ["colour", "position", "alpha", "zeta"]


def test_lmms_evals_model_args_refuse_k_beside_flops():
    """M23: k beside a reachable share was dropped without a word."""
    from asapcli.lmms_eval.arguments import ModelArgs

    with pytest.raises(UsageError, match="model_args: give k or flops, not both"):
        ModelArgs.parse({"pretrained": "demo", "method": "fastv", "k": 64, "flops": "60%"})
