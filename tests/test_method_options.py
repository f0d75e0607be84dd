"""The methods' hyperparameters are declared once (engine.HYPERPARAMETERS); a method takes those it
has a field for; every command offers each once; an option the chosen method ignores is refused."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from asapcli.cli import app
from asapcli.commands import options
from asapcli.engine import HYPERPARAMETERS, METHODS
from asapcli.engine.settings import PruneSettings
from asapcli.errors import UsageError


def test_a_method_takes_the_declared_hyperparameters_it_has_fields_for():
    for name, method in METHODS.items():
        fields = {field.name for field in dataclasses.fields(method)}
        assert set(method.hyperparameters()) == fields & set(HYPERPARAMETERS), name
    assert METHODS["fastv"].hyperparameters() == ["score_queries", "score", "kv_cache"]
    assert "merge_threshold" not in METHODS["asap-bimask-only"].hyperparameters()  # it merges nothing
    assert METHODS["vanilla"].hyperparameters() == []


@pytest.mark.parametrize("command", ["run", "chat", "profile", "eval"])
def test_every_pruning_command_offers_each_hyperparameter_once(command):
    """Each hyperparameter of a method the command takes, once."""
    click_command = typer.main.get_command(app).commands[command]
    flags = [flag for parameter in click_command.params for flag in parameter.opts]
    methods = list(METHODS.values())
    for name, hyperparameter in HYPERPARAMETERS.items():
        taken = any(name in method.hyperparameters() for method in methods)
        assert flags.count(hyperparameter.flag) == int(taken), (command, hyperparameter.flag)
    assert len(flags) == len(set(flags))


def test_an_option_the_method_ignores_is_a_usage_error_naming_its_options(image_file, asap):
    result = asap("run", image_file, "what?", "--method", "fastv", "--merge-threshold", 0.1, "--lambda-max", 0.5)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: --lambda-max is not an option of fastv (fastv takes --score-queries, --score, --kv-cache); "
        "asap, asap-bimask-only take it"
    )
    result = asap("run", image_file, "what?", "--method", "vanilla", "--score", "attention")
    assert result.exit_code == 2 and "vanilla takes none of the method options" in result.stderr
    result = asap("chat", "--method", "asap-bimask-only", "--merge-threshold", 0.5)
    assert result.exit_code == 2 and "--merge-threshold is not an option of asap-bimask-only" in result.stderr
    result = asap("profile", "--methods", "vanilla,fastv", "--lambda-max", 0.5)
    assert result.exit_code == 2 and "--lambda-max is not an option of vanilla, fastv" in result.stderr


def test_a_comparison_gives_each_method_the_options_it_takes():
    given = options.Comparison(methods="vanilla,fastv,asap", lambda_max=0.5, merge_threshold=0.8)
    base, fastv, asap_run = given.grid(None).runs()
    assert base.method.name == "vanilla" and base.hyperparameters == {}
    assert fastv.hyperparameters == {} and base.for_method("fastv").hyperparameters == {}
    assert asap_run.hyperparameters == {"lambda_max": 0.5, "merge_threshold": 0.8}  # not lost behind vanilla
    assert base.replace(method="asap", lambda_max=0.5, merge_threshold=0.8).hyperparameters == {
        "lambda_max": 0.5,
        "merge_threshold": 0.8,
    }
    bimask = PruneSettings("asap", lambda_max=0.5, merge_threshold=0.8).for_method("asap-bimask-only")
    assert bimask.hyperparameters == {"lambda_max": 0.5}
    with pytest.raises(UsageError, match="merge-threshold is a cosine similarity in"):
        PruneSettings("asap", merge_threshold=float("nan"))
    with pytest.raises(UsageError, match="unknown option lambda_mx; the methods' options are lambda_max,"):
        PruneSettings("asap", lambda_mx=0.5)  # the API's docstring promises a UsageError, not a TypeError
    for seed in (-1, 2**70):  # what torch and the random method cannot take: refused, not overflowed
        with pytest.raises(UsageError, match=f"seed must be a whole number from 0 to 4294967295, got {seed}"):
            PruneSettings("random", seed=seed)


def test_an_option_one_method_takes_says_so_in_the_singular():
    from asapcli.engine.settings import PruneSettings
    from asapcli.errors import UsageError

    with pytest.raises(UsageError, match=r"; asap takes it$"):
        PruneSettings("fastv", merge_threshold=0.5)
