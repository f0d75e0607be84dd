"""--flops PCT: each method at the largest k whose visual FLOPs (Eq. 7-8) stay within the share."""

import json

import pytest

from asapcli.engine import cost
from asapcli.errors import UsageError

CAR = "examples/car.png"


def ratio(asap, method: str, k: int) -> float:
    return json.loads(asap("flops", "--method", method, "-k", k, "--json").stdout)["flops_ratio"]


@pytest.mark.parametrize("method", ["asap", "divprune", "pdrop"])
def test_run_at_a_flops_share_takes_the_largest_k_within_it(method, asap):
    result = asap("run", CAR, "what colour is the car?", "--method", method, "--flops", "60%", "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["flops_ratio"] <= 0.60 < ratio(asap, method, answer["k"] + 1)
    assert answer["flops_ratio"] == pytest.approx(ratio(asap, method, answer["k"]))


def test_eval_at_equal_flops_gives_each_method_its_own_k(asap):
    args = ["eval", "--n", 4, "--methods", "vanilla,fastv,divprune,pdrop", "--flops", "55%,70%", "--threads", 1]
    result = asap(*args, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [row["method"] for row in rows] == ["vanilla"] + ["fastv", "divprune", "pdrop"] * 2
    for target, group in ((0.55, rows[1:4]), (0.70, rows[4:])):
        assert all(target - 0.01 < row["flops_ratio"] <= target for row in group)
    assert len({row["k"] for row in rows[1:4]}) == 3  # equal cost, three budgets


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", CAR, "hi", "--flops", "5%"],
            "asap cannot prune to 5.00% of vanilla's visual FLOPs on this model: the least",
        ),
        (["run", CAR, "hi", "--flops", "50%", "-k", 64], "give -k or --flops, not both"),
        (["run", CAR, "hi", "--flops", "30%,40%"], "--flops takes one share here"),
        (["eval", "--n", 2, "--flops", "150%"], "--flops must be above 0 and at most 100%"),
        (["flops", "-m", "llava-next-7b", "--flops", "30%"], "--flops needs one visual-token count per image"),
        (["profile", "--flops", "half"], "--flops takes percentages (25%) or fractions (0.25), got 'half'"),
    ],
)
def test_flops_shares_refused_in_one_line(args, message, asap):
    result = asap(*args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, result.output


def test_the_flops_command_prints_the_budget_a_share_gives(asap):
    counted = json.loads(asap("flops", "-m", "llava-1.5-7b", "--method", "divprune", "--flops", "0.3", "--json").stdout)
    assert counted["k"] == 175 and counted["flops_ratio"] <= 0.3


def test_targets_parse_as_percentages_or_fractions():
    assert cost.parse_targets("25%, 0.5,25%") == [0.25, 0.5]
    with pytest.raises(UsageError, match="--flops is empty"):
        cost.parse_targets(" , ")


def test_the_api_and_lmms_evals_model_args_take_a_flops_share():
    import torch

    import asapcli
    from asapcli.lmms_eval.arguments import ModelArgs
    from asapcli.runtime.inputs import build_inputs, load_image, user_message

    demo = asapcli.load("demo", progress=False)
    inputs = build_inputs(demo.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    with torch.inference_mode(), asapcli.pruned(demo, method="divprune", flops=0.6) as pruning:
        demo.model.generate(**inputs, max_new_tokens=2)
    report = pruning.report()
    assert report.flops_ratio <= 0.6 and report.k == ModelArgs.parse({"method": "divprune", "flops": "60%"}).prune.k
    with pytest.raises(UsageError, match="give k or flops, not both"):
        asapcli.pruned(demo, k=64, flops="60%")
    with pytest.raises(UsageError, match="model_args: asap cannot prune to 5.00% .* give flops=50.06% or more"):
        ModelArgs.parse({"pretrained": "demo", "flops": "5%"})


@pytest.mark.parametrize(
    "args, message",
    [
        (["flops", "--method", "sparsevlm", "--stage-counts", "table", "--flops", "60%"], None),  # its table's budgets
        (["run", CAR, "hi", "--flops", "5%", "--method", "prumerge-plus", "--adaptive"], "--adaptive keeps each image"),
        (["run", CAR, "hi", "--flops", "60%", "--method", "pdrop", "--stage-ratio", "0.5"], "do not depend on k"),
        (["flops", "--flops", "75.0%", "--layer", 3], "the least it runs at is 75.03%; give --flops 75.03% or more"),
        (["flops", "--flops", "100%"], "--flops 100% keeps every visual token of demo: nothing pruned to count"),
        (["flops", "--visual-tokens", 1, "--flops", "60%"], "an image of 1 visual token leaves nothing to prune"),
        (["flops", "-m", "llava-next-7b", "--flops", "30%"], "(or --visual-tokens N, the count to choose k for)"),
    ],
)
def test_the_second_passs_flops_cases(args, message, asap):
    """A table's budgets only (a KeyError before), an adaptive or fixed count refused (it ran at
    17.7% for 5%), numbers that do not contradict each other, advice that can be followed."""
    result = asap(*args)
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, (
            result.output
        )


def test_the_apis_generate_takes_flops_in_its_own_words():
    import asapcli

    demo = asapcli.load("demo", progress=False)
    result = asapcli.generate(demo, CAR, "what colour is the car?", method="divprune", flops=0.6, max_tokens=2)
    assert result.flops_ratio <= 0.6
    with pytest.raises(UsageError, match="flops must be a share of vanilla's FLOPs, 0.25 or '25%', got \\[0.5, 0.6\\]"):
        asapcli.pruned(demo, flops=[0.5, 0.6])
    with pytest.raises(UsageError, match="^flops must be above 0"):
        asapcli.pruned(demo, flops=2)
