"""The commands of the README and docs/ run as shown: every `asap ...` line of their examples
that needs no network, no file of the reader's own and at most a few seconds runs, with the
result its comment promises, in the time it promises (a comment's "about a minute", "20 s";
seconds where it says nothing; judged only on a machine not busier than its cores, where times
mean something), each time recorded in the test report; the others (and commands
quoted in the text) are parsed, so that every option they name exists and takes the value they
give."""

import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
import typer.main

from asapcli.cli import app
from asapcli.measure import stability
from asapcli.runtime import machine

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Shown, not run here: they name the reader's own files or a hub checkpoint (no network here),
# or run for minutes (the same paths run smaller in the other tests).
NOT_OFFLINE = ("cars.jpg", "photo.jpg", "llava-hf/", "./some/local/model", "--random-weights", "--device cuda")
SLOW = ("-m bench", "--n 500", "--n 200", "--n 400", "--n 1000", "-n 1000", "-n 500", "-n 200", "-n 100")


def example_lines(document: Path) -> list[str]:
    """The `asap ...` commands of a document's examples, as typed: indented blocks, and fenced
    blocks (only their `$ ` lines where they show a session with its output). A line
    `pip install ... && asap ...` gives its asap part."""
    lines, blocks, fence = document.read_text().splitlines(), [], None
    for line in lines:
        if line.startswith("```"):
            fence = [] if fence is None else blocks.append(fence)
        elif fence is not None:
            fence.append(line)
        elif line.startswith("    "):
            blocks.append([line.strip()])
    commands = []
    for block in blocks:
        session = any(line.startswith("$ ") for line in block)
        for line in block:
            if session and not line.startswith("$ "):
                continue  # output shown under a command
            text = line.strip().removeprefix("$ ")
            if "&& asap " in text:
                text = "asap " + text.split("&& asap ", 1)[1]
            if text.startswith("asap "):
                commands.append(text)
    return commands


def quoted_commands(document: Path) -> list[str]:
    """`asap ...` commands quoted in a document's text, with at least one option."""
    quoted = (" ".join(text.split()) for text in re.findall(r"`(asap [^`]+)`", document.read_text()))
    return [text for text in quoted if " -" in text]


def runnable(command: str) -> bool:
    return not any(part in command for part in NOT_OFFLINE + SLOW)


def readme_commands() -> list[str]:
    return [command for document in DOCUMENTS for command in example_lines(document) if runnable(command)]


def shown_only() -> list[str]:
    every = [command for document in DOCUMENTS for command in example_lines(document) + quoted_commands(document)]
    return sorted({command for command in every if not runnable(command) or command not in readme_commands()})


# A command the docs give no time for takes seconds: at most this, on 2 busy cores.
SECONDS = 30.0
SLACK = 3.0  # a promised time is the demo's on an idle machine: CI's cores are shared


def promised_seconds(comment: str) -> float:
    """The time a command's comment promises ("about a minute", "20 s", "2 min"), else SECONDS."""
    if "about a minute" in comment:
        return 60.0
    found = re.search(r"(\d+) ?(s|seconds|min|minutes)\b", comment)
    if found is None:
        return SECONDS
    return float(found.group(1)) * (60 if found.group(2).startswith("min") else 1)


def test_a_comment_promises_a_time_in_its_words():
    assert promised_seconds("150 answers: about a minute") == 60.0
    assert promised_seconds("the attention shift, 20 s") == 20.0 and promised_seconds("2 min") == 120.0
    assert promised_seconds("circle") == SECONDS


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_shown(command, tmp_path, monkeypatch, asap, record_property):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "asapcli").symlink_to(REPO / "asapcli")  # files the docs name inside the package (a task's questions)
    (tmp_path / "docs" / "figures").mkdir(parents=True)  # where docs/figures.md's commands write their figures
    monkeypatch.chdir(tmp_path)  # outputs the command writes (kept.png) land here
    arguments, _, comment = command.partition("  # ")
    started = time.perf_counter()
    result = asap(*shlex.split(arguments)[1:])
    seconds = time.perf_counter() - started
    record_property("seconds", round(seconds, 1))  # in the junit report (--junitxml) of every run
    assert result.exit_code == 0, result.output
    promised = promised_seconds(comment)
    # judged by the tool's own rule: on an oversubscribed machine a time means nothing (PyTorch 10-100x slower)
    if not stability.oversubscribed(machine.load_average(), machine.available_cpus()):
        assert seconds <= SLACK * promised, f"{command}: {seconds:.0f} s, the docs promise {promised:.0f} s"
    for figure in re.findall(r"\d+\.\d+%?", comment):  # the figures a comment promises
        assert figure in result.stdout, (figure, result.stdout)
    if arguments.startswith("asap run") and comment:
        assert result.stdout.splitlines()[0] == comment.split()[0].strip(",")  # the answer promised


def test_the_offline_examples_are_all_found():
    assert len(readme_commands()) >= 8


@pytest.mark.parametrize("command", shown_only())
def test_a_command_shown_but_not_run_parses(command):
    arguments = shlex.split(command.partition("  # ")[0])[1:]
    group = typer.main.get_command(app)
    if arguments[0].startswith("-"):  # the app's own options (--version, --help): eager, so not run here
        known = {"--help", *(name for parameter in group.params for name in parameter.opts)}
        assert set(arguments) <= known, f"{command}: not an option of asap"
        return
    with group.make_context("asap", list(arguments), resilient_parsing=True) as context:
        subcommand = group.get_command(context, arguments[0])
        assert subcommand is not None, f"no command {arguments[0]!r}"
        if "--help" not in arguments:  # eager: it would print the help and stop here
            subcommand.make_context(arguments[0], arguments[1:], parent=context)  # raises on an unknown option or value


def test_the_shown_commands_are_all_found():
    assert len(shown_only()) >= 5


# A measured time: a number with a unit of time ("655 ms", "3 min 17 s", "7-10 s", "12.7 minutes").
MEASURED_TIME = re.compile(r"\b\d[\d,.]*(?:-\d[\d,.]*)? ?(?:ms|s|min|minutes|seconds|hours)\b")
# Times that are not measurements: a rhythm, a limit, a rate of the machine's own tool.
NOT_A_MEASUREMENT = re.compile(
    r"every \d+ s|at most \d+|\d+ ?(?:s|min|minutes) at most|(?:limit|timeout|budget)[^.;]*?\d+ ?(?:s|min|minutes)\b"
)
# What a time depends on, each said next to it: where (the cores, or the GPU), the threads, how busy.
CONDITIONS = {"cores": ("core", "cpu", "gpu", "h100", "h200"), "threads": ("thread", "gpu", "h100", "h200"),
              "load": ("idle", "load", "busy", "gpu", "h100", "h200")}  # fmt: skip


def sections(document: Path) -> list[tuple[str, list[str]]]:
    """A document's sections (from one heading to the next): the heading line and its paragraphs."""
    found: list[tuple[str, list[str]]] = [("", [])]
    for paragraph in re.split(r"\n\s*\n", document.read_text()):
        if paragraph.lstrip().startswith("#") and not paragraph.lstrip().startswith("#!"):
            found.append((paragraph.strip().splitlines()[0], []))
        found[-1][1].append(paragraph)
    return found


def unconditioned_times(document: Path) -> list[str]:
    """The measured times of a document whose section does not say on what they were measured."""
    missing = []
    for heading, paragraphs in sections(document):
        text = "\n".join([heading, *paragraphs]).lower()
        lacking = [name for name, words in CONDITIONS.items() if not any(word in text for word in words)]
        for paragraph in paragraphs:
            times = MEASURED_TIME.findall(NOT_A_MEASUREMENT.sub("", paragraph))
            if times and lacking:
                missing.append(f"{document.name} {heading!r}: {times[0]!r} without {', '.join(lacking)}")
    return missing


def test_every_time_in_the_docs_says_its_conditions():
    """A time quoted without its cores, threads and load is a figure nobody can compare (issue 33)."""
    missing = [found for document in DOCUMENTS for found in unconditioned_times(document)]
    assert not missing, "\n".join(missing)


def test_a_time_without_its_conditions_is_found(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("# Speed\n\nA prefill takes 655 ms.\n\n# Other\n\nOn 2 idle cores, 1 thread: 1.7 s.\n")
    assert unconditioned_times(document) == ["doc.md '# Speed': '655 ms' without cores, threads, load"]
    document.write_text("# Speed\n\nA progress line every 10 s; the step's limit is 60 s.\n")
    assert unconditioned_times(document) == []


def test_ci_runs_the_readmes_test_commands_verbatim():
    """A missing install step fails in CI, not for a user: .ci/run is the README's commands."""
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in readme.splitlines() if "python -m pytest" in line and line.startswith("    ")]
    assert len(commands) == 2 and all(command in ci for command in commands), commands


@pytest.mark.parametrize(
    "document, methods_row, options_row",
    [("README.md", "| `--method` |", "| `--lambda-max`"), ("docs/lmms-eval.md", "| `method` |", "| `lambda_max`")],
)
def test_the_docs_name_every_registered_method_and_option(document, methods_row, options_row):
    """The method registry is the list; the docs' rows that list methods and their options are
    checked against it, so that a new method's module cannot leave them stale."""
    from asapcli.engine.methods import HYPERPARAMETERS, METHODS

    lines = (REPO / document).read_text().splitlines()
    methods, options = (next(line for line in lines if line.startswith(row)) for row in (methods_row, options_row))
    assert set(METHODS) <= set(re.findall(r"`([a-z][a-z0-9-]*)`", methods))
    spelled = {name.replace("_", "-") if document == "README.md" else name for name in HYPERPARAMETERS}
    assert spelled <= set(re.findall(r"`-*([a-z_-]+)`", options))
