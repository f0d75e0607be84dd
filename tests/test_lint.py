"""The guard rails, run with the tests (so CI runs them): ruff's lint with its size rules (a
function's complexity at most 10, its statements at most 50: pyproject.toml's [tool.ruff.lint]),
ruff's formatting, and no function of the package over 50 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKED = ["asapcli", "tests", "scripts"]
MOST_LINES = 50


def ruff(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff", *arguments, *CHECKED]
    found = subprocess.run(command, cwd=REPO, check=False, capture_output=True, text=True)
    if "No module named ruff" in found.stderr:
        pytest.fail('ruff is not installed: pip install -e ".[test]" brings it')
    return found


def test_ruffs_lint_passes_with_the_size_rules():
    found = ruff("check", "--output-format", "concise")
    assert found.returncode == 0, found.stdout + found.stderr


def test_the_code_is_formatted_as_ruff_formats_it():
    found = ruff("format", "--check")
    assert found.returncode == 0, found.stdout + found.stderr


def long_functions(root: Path) -> list[str]:
    """Every function under `root` longer than MOST_LINES lines (its decorators and docstring included)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
                if node.end_lineno - first + 1 > MOST_LINES:
                    found.append(
                        f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - first + 1} lines"
                    )
    return found


def test_no_function_of_the_package_is_over_50_lines():
    assert long_functions(REPO / "asapcli") == []


def test_a_long_function_is_found(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MOST_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[__name__], "REPO", tmp_path)
        assert long_functions(tmp_path) == [f"long.py:1 long: {MOST_LINES + 1} lines"]
