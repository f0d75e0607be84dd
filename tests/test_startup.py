"""`asap --help` and arithmetic on a preset start in a blink: they never import torch,
transformers or the image libraries (5-6 s of CPU on a small machine before this was so)."""

import subprocess
import sys

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
