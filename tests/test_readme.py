"""The README's commands run as shown: every `asap ...` line of its examples that needs no
network, no file of the reader's own and at most a few seconds, with the result its comment
promises."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asapcli.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()

# Shown in the README, not run here: they name the reader's own files or a hub checkpoint (no
# network here), or run for minutes (the same paths run smaller in the other tests).
NOT_OFFLINE = ("cars.jpg", "photo.jpg", "llava-hf/", "./some/local/model")
SLOW = ("-m bench", "--n 500", "--n 200")


def readme_commands() -> list[str]:
    commands = []
    for line in (REPO / "README.md").read_text().splitlines():
        if not line.startswith(("    ", "$ ")):  # a command, not the output shown under one
            continue
        text = line.strip().removeprefix("$ ")
        if "&& asap " in text:
            text = "asap " + text.split("&& asap ", 1)[1]
        if text.startswith("asap ") and not any(part in text for part in NOT_OFFLINE + SLOW):
            commands.append(text)
    return commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_shown(command, tmp_path, monkeypatch):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)  # outputs the command writes (kept.png) land here
    arguments, _, comment = command.partition("  # ")
    result = runner.invoke(app, shlex.split(arguments)[1:])
    assert result.exit_code == 0, result.output
    for figure in re.findall(r"\d+\.\d+%?", comment):  # the figures a comment promises
        assert figure in result.stdout, (figure, result.stdout)
    if arguments.startswith("asap run") and comment:
        assert result.stdout.splitlines()[0] == comment.split()[0].strip(",")  # the answer promised


def test_the_offline_examples_are_all_found():
    assert len(readme_commands()) >= 8
