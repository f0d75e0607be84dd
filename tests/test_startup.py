"""`asap --help`, arithmetic on a preset and a usage error start and end in a blink: they never import torch,
transformers or the image libraries (5-6 s of CPU on a small machine before this was so)."""

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "huggingface_hub", "accelerate", "fvcore", "PIL", "numpy", "matplotlib")

SCRIPT = """
import sys
from asapcli import main
sys.argv = ["asap", *{arguments!r}]
try:
    main()
except SystemExit as done:
    code = done.code
print("EXIT", code, file=sys.stderr)
print("HEAVY", [name for name in {heavy!r} if name in sys.modules], file=sys.stderr)
"""


@pytest.mark.parametrize(
    "arguments",
    [
        ["--help"],
        ["--version"],
        ["flops", "-m", "llava-1.5-7b"],
        ["flops", "-m", "llava-next-7b", "--schedule", "2:960,16:480", "--json"],
        ["models"],
        ["models", "--json"],
        *[[command, "--help"] for command in ("run", "chat", "compare", "flops", "profile", "eval")],
    ],
    ids=" ".join,
)
def test_the_command_imports_no_heavy_library(arguments):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(arguments=arguments, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = dict(line.split(" ", 1) for line in result.stderr.splitlines() if line.startswith(("EXIT", "HEAVY")))
    assert lines["HEAVY"] == "[]", result.stderr
    assert lines["EXIT"] in ("0", "None"), result.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["run", "examples/car.png", "hi", "--method", "fastvv"], "'fastvv' is not one of vanilla, asap,"),
        (["run", "examples/car.png", "hi", "--dtype", "fp16"], "'fp16' is not one of auto, bfloat16"),
        (["run", "examples/car.png", "hi", "--device", "gpu"], "'gpu' is not one of auto, cpu, cuda"),
        (["run", "examples/car.png", "hi", "-k", "0"], "k needs a whole number of at least 1, got '0'"),
        (["run", "examples/car.png", "hi", "--positions", "renum"], "did you mean 'renumber'?"),
        (["profile", "--k", "0"], "k needs a whole number of at least 1, got '0'"),
        (["profile", "--format", "mardown"], "did you mean 'markdown'?"),
        (["eval", "--methods", "vanilla,fastvv"], "'fastvv' is not one of vanilla, asap,"),
        (["compare", "examples/car.png", "hi", "--methods", "asap,divprun"], "did you mean 'divprune'?"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_a_usage_error_is_refused_as_the_command_line_is_read(arguments, message):
    """Before: each waited for torch and transformers to import (5-17 s) and suggested nothing."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(arguments=arguments, heavy=HEAVY)],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lines = dict(line.split(" ", 1) for line in result.stderr.splitlines() if line.startswith(("EXIT", "HEAVY")))
    assert lines["EXIT"] == "2" and message in result.stderr, result.stderr
    assert lines["HEAVY"] == "[]", result.stderr


def test_a_choice_completes_in_the_shell():
    from typer.testing import CliRunner

    from asapcli.cli import app

    environment = {"_ASAP_COMPLETE": "complete_bash", "COMP_WORDS": "asap run --method div", "COMP_CWORD": "3"}
    result = CliRunner().invoke(app, [], env=environment, prog_name="asap")
    assert result.stdout.split() == ["divprune"]
    environment["COMP_WORDS"], environment["COMP_CWORD"] = "asap eval --methods vanilla,fa", "3"
    assert CliRunner().invoke(app, [], env=environment, prog_name="asap").stdout.split() == ["vanilla,fastv"]


TORCH = ("torch", "transformers")
TIMED = SCRIPT.replace(
    'print("EXIT", code, file=sys.stderr)',
    "import resource\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    'print("CPU", usage.ru_utime + usage.ru_stime, file=sys.stderr)\n'
    'print("EXIT", code, file=sys.stderr)',
)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["run", "missing.png", "hi"], "image not found: missing.png"),
        (["run", "examples", "hi"], "is a folder"),
        (["run", "README.md", "hi"], "README.md"),
        (["run", "examples/car.png", "hi", "--save-kept", "out.gif"], ".gif"),
        (["run", "examples/car.png", "hi", "--device", "cuda"], "no CUDA GPU is available; use --device cpu"),
        (["chat", "missing.png"], "image not found: missing.png"),
        (["compare", "missing.png", "hi"], "image not found: missing.png"),
        (["profile", "--image", "missing.png"], "image not found: missing.png"),
        (["profile", "--device", "cuda:1"], "no CUDA GPU is available"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_a_bad_input_is_refused_before_torch_is_imported(arguments, message, monkeypatch):
    """Files, output suffixes and devices were checked after torch and transformers were imported:
    "image not found" came after 9.7 s, --device cuda on a CPU machine after 7.9 s (issue 35)."""
    if "cuda" in " ".join(arguments):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # none visible, whatever this machine has
    result = subprocess.run(
        [sys.executable, "-c", TIMED.format(arguments=arguments, heavy=TORCH)],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lines = dict(line.split(" ", 1) for line in result.stderr.splitlines() if line.startswith(("EXIT", "HEAVY", "CPU")))
    assert lines["EXIT"] in ("1", "2") and message in result.stderr, result.stderr
    assert lines["HEAVY"] == "[]", result.stderr
    assert float(lines["CPU"]) < 1.0, f"{float(lines['CPU']):.2f} s of CPU"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["run", "examples/car.png", "hi", "-m", "qwen2.5-vl-7b", "--random-weights", "--method", "vispruner"],
            "has no [CLS] token",
        ),
        (["run", "examples/car.png", "hi", "--device-map", "nofile.json"], "--device-map nofile.json: no such file"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_what_the_config_or_a_file_tells_is_refused_before_torch(arguments, message):
    result = subprocess.run(
        [sys.executable, "-c", TIMED.format(arguments=arguments, heavy=TORCH)],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lines = dict(line.split(" ", 1) for line in result.stderr.splitlines() if line.startswith(("EXIT", "HEAVY", "CPU")))
    assert lines["EXIT"] == "2" and message in result.stderr, result.stderr
    assert lines["HEAVY"] == "[]" and float(lines["CPU"]) < 1.0, result.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["eval", "--data", "missing.jsonl"], "question file not found: missing.jsonl"),
        (["eval", "--data", "README.md"], "README.md:1: not JSON"),
        (["eval", "--n", "2", "--plot", "out.gif"], ".gif"),
        (["eval", "--n", "2", "--log", "no/such/folder/log.jsonl"], "folder no/such/folder does not exist"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_evals_files_are_refused_before_torch(arguments, message):
    """eval read its questions and checked its output files after torch's import (4-7 s)."""
    result = subprocess.run(
        [sys.executable, "-c", TIMED.format(arguments=arguments, heavy=TORCH)],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lines = dict(line.split(" ", 1) for line in result.stderr.splitlines() if line.startswith(("EXIT", "HEAVY", "CPU")))
    assert lines["EXIT"] in ("1", "2") and message in result.stderr, result.stderr
    assert lines["HEAVY"] == "[]" and float(lines["CPU"]) < 1.0, result.stderr
