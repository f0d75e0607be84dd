"""`asap eval` and lmms-eval's model `asap` as the user drives them: without -k, eval runs every
budget of the model's preset; a run stopped by Ctrl-C reports the runs that answered and no
empty row; and lmms-eval's `true`/`false` (which it turns into booleans) are no numbers."""

import importlib.util
import json
import sys

import pytest

from asapcli.errors import UsageError
from asapcli.lmms_eval.arguments import ModelArgs
from asapcli.measure import evaluation
from asapcli.runtime.presets import find_preset


def test_eval_without_k_runs_every_budget_of_the_preset(asap):
    budgets = list(find_preset("demo").budgets)
    assert len(budgets) > 1
    result = asap("eval", "-n", 1, "--methods", "vanilla,fastv", "--json")
    assert result.exit_code == 0, result.output
    rows = [(row["method"], row["k"]) for row in json.loads(result.stdout)["results"]]
    assert rows == [("vanilla", None)] + [("fastv", k) for k in budgets]


def test_a_stopped_eval_has_no_row_for_a_run_that_gave_no_answer(asap, monkeypatch):
    """Questions go to every run in turn: stopped on the third call, vanilla and fastv have
    answered the first question and asap none."""
    calls = []
    answer = evaluation.generate_batch

    def interrupted_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return answer(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_batch", interrupted_on_the_third)
    result = asap("eval", "-n", 2, "--methods", "vanilla,fastv,asap", "-k", 64, "--json")
    assert result.exit_code == 130
    report = json.loads(result.stdout)
    assert report["partial"] is True
    assert [(row["method"], row["questions"]) for row in report["results"]] == [("vanilla", 1), ("fastv", 1)]


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_number_for_a_method_option(value):
    with pytest.raises(UsageError, match="lambda-max needs a number"):
        ModelArgs.parse({"pretrained": "demo", "method": "asap", "lambda_max": value})


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")
def test_lambda_max_true_on_lmms_evals_command_line_is_refused(monkeypatch, capsys):
    """lmms-eval reads `lambda_max=true` as True; taken as a number it would run as 1.0."""
    from asapcli.lmms_eval.__main__ import main

    argv = ["lmms_eval", "--model", "asap", "--model_args", "pretrained=demo,lambda_max=true", "--tasks", "asap_demo"]
    monkeypatch.setattr(sys, "argv", argv)
    assert main() == 2
    assert capsys.readouterr().err == "Error: lambda-max needs a number, got True\n"
