"""`asap eval` and lmms-eval's model `asap` as the user drives them: without -k, eval runs every
budget of the model's preset; a run stopped by Ctrl-C reports the runs that answered and no
empty row; lmms-eval's `true`/`false` (which it turns into booleans) are no numbers; a --log that
is standard output is refused, and an ASCII-only terminal gets its table."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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
@pytest.mark.lmms_eval  # the launcher imports lmms-eval: the eval extra's step runs it
@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")
def test_lambda_max_true_on_lmms_evals_command_line_is_refused(monkeypatch, capsys):
    """lmms-eval reads `lambda_max=true` as True; taken as a number it would run as 1.0."""
    from asapcli.lmms_eval.__main__ import main

    argv = ["lmms_eval", "--model", "asap", "--model_args", "pretrained=demo,lambda_max=true", "--tasks", "asap_demo"]
    monkeypatch.setattr(sys, "argv", argv)
    assert main() == 2
    assert capsys.readouterr().err == "Error: model_args: lambda_max needs a number, got True\n"


def test_a_log_that_is_standard_output_is_refused_before_the_run(tmp_path):
    """`--log /dev/stdout > out.txt`: the table wrote over the answers in the file."""
    out = tmp_path / "out.txt"
    with open(out, "w") as stdout:
        result = subprocess.run(
            [sys.executable, "-m", "asapcli", "eval", "--n", "2", "--methods", "vanilla", "--log", "/dev/stdout"],
            stdout=stdout, stderr=subprocess.PIPE, text=True, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr
        == "Error: refusing to write /dev/stdout: it is standard output, where the results go; give it a file\n"
    )
    assert out.read_text() == ""


def test_an_ascii_terminal_gets_the_table_not_an_encoding_error():
    """PYTHONIOENCODING=ascii: every answer was computed, then '±' (now the rule's '─') lost the table."""
    environment = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run(
        [sys.executable, "-m", "asapcli", "eval", "--n", "2", "--methods", "vanilla"],
        capture_output=True, env=environment, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-500:]
    assert b"100.0" in result.stdout and b" 95%" in result.stdout and b"Error" not in result.stderr


def test_a_question_too_long_for_the_context_is_refused_before_the_first_answer(tmp_path, asap):
    """It was found after 60 answers: an error, no table, no line named, every answer lost."""
    car = Path(__file__).resolve().parents[1] / "examples" / "car.png"
    good = {"image": str(car), "question": "what colour is the car?", "answer": "red"}
    long = {**good, "question": "what colour is the car? " * 300}
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in (good, good, long)))
    log = tmp_path / "log.jsonl"
    result = asap("eval", "--data", data, "--methods", "vanilla,fastv", "-k", 64, "--log", log)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: question 3: its prompt is ") and "no room for an answer" in result.stderr
    assert not log.exists() or log.read_text() == ""  # refused before the first answer


def test_a_log_that_fills_its_disk_loses_neither_the_table_nor_the_answers(tmp_path, asap, monkeypatch):
    """A full disk under --log after some answers: the run went down with an OSError naming no
    file, no table, the --plot on another disk unwritten, the log cut mid-line."""
    log, plot = tmp_path / "log.jsonl", tmp_path / "accuracy.png"
    budget = {"bytes": 600}  # room for two or three lines of the log, as a tiny filesystem would give
    log.write_text("a line of an earlier run\n" * 100)  # replaced, not padded back to its length

    real_write = evaluation.AnswerLog.write

    def filling_write(self, *args):
        original = self.file.write

        def write(data):
            if self.file.tell() + len(data) > budget["bytes"]:
                original(data[: budget["bytes"] - self.file.tell()])  # what a full disk takes of it
                raise OSError(28, "No space left on device")
            return original(data)

        self.file.write = write
        return real_write(self, *args)

    monkeypatch.setattr(evaluation.AnswerLog, "write", filling_write)
    result = asap("eval", "--n", 4, "--methods", "vanilla,fastv", "-k", 64, "--log", log, "--plot", plot)
    assert result.exit_code == 1
    assert "vanilla" in result.stdout and "fastv" in result.stdout  # the table, every answer scored
    assert plot.is_file()
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith(f"Error: cannot write {log}: No space left on device after")
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["method"] in ("vanilla", "fastv") for line in lines)  # whole lines only


def test_two_runs_cannot_write_one_log(tmp_path, asap):
    """Two evals on one --log interleaved their lines (2 of 40 garbled, no warning)."""
    import fcntl

    log = tmp_path / "log.jsonl"
    with open(log, "ab") as held:  # another run's log, open and locked
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(b'{"answer": "theirs"}\n')
        result = asap("eval", "--n", 2, "--methods", "vanilla", "--log", log)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {log} is being written by another run; give this one a log of its own"
    assert log.read_text() == '{"answer": "theirs"}\n'  # left as the other run wrote it


def test_more_presses_after_the_first_do_not_cut_the_partial_table(monkeypatch, asap):
    """Ctrl-C five times in a row: the first ends the answering; the next ones, arriving while the
    partial table prints, are ignored (they used to raise inside rich: a traceback, no table)."""
    import asapcli.commands.eval as eval_command

    answer, printed = evaluation.generate_batch, []

    def interrupted_on_the_third(*args, **kwargs):
        if len(printed) == 2:
            raise KeyboardInterrupt
        printed.append(1)
        return answer(*args, **kwargs)

    show = eval_command._show

    def pressed_four_times_while_printing(outcome):
        for _ in range(4):
            os.kill(os.getpid(), signal.SIGINT)
        show(outcome)

    monkeypatch.setattr(evaluation, "generate_batch", interrupted_on_the_third)
    monkeypatch.setattr(eval_command, "_show", pressed_four_times_while_printing)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest started by nohup ignores it
    result = asap("eval", "-n", 2, "--methods", "vanilla,fastv")
    assert result.exit_code == 130, result.output
    assert "Partial: interrupted after 2 of 8 answers" in result.stdout
    assert "Interrupted after 2 answers" in result.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the fixture restored it
    signal.signal(signal.SIGINT, before)


def test_a_log_and_a_plot_on_a_full_disk_are_both_reported(tmp_path, asap, monkeypatch):
    """The log kept 17 of 60 answers and the only error named the plot: the log's is said first."""
    from asapcli.report import figures

    log, plot = tmp_path / "log.jsonl", tmp_path / "accuracy.png"
    real_write = evaluation.AnswerLog.write

    def full_after_one(self, *args):
        if self.lines >= 1:
            self.error = f"No space left on device after {self.lines} answers"
            return None
        return real_write(self, *args)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(plot))

    monkeypatch.setattr(evaluation.AnswerLog, "write", full_after_one)
    monkeypatch.setattr(figures, "save_figure", full)
    result = asap("eval", "--n", 3, "--methods", "vanilla,fastv", "-k", 64, "--log", log, "--plot", plot)
    assert result.exit_code == 1 and "fastv" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and errors[0].startswith(f"Error: cannot write {log}: No space left on device after 1")
    assert str(plot) in errors[1]
