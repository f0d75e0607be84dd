"""--format csv|markdown|latex on profile, eval and flops: each parsed back to what --json says."""

import csv
import io
import json

import pytest

from asapcli.report.display import flat


@pytest.fixture
def stdout_of(asap):
    """What `asap ARGS` printed on stdout, after checking that it succeeded."""

    def run(*args):
        result = asap(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    return run


def markdown_rows(text: str) -> list[dict]:
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()]
    header, rule, *body = lines
    assert set(rule) == {"---"}
    return [dict(zip(header, line, strict=True)) for line in body]


def same(cell: str, value) -> bool:
    """A CSV cell against the JSON value it came from (every digit kept; null as empty)."""
    if value is None:
        return cell == ""
    if isinstance(value, float):
        return float(cell) == value
    if isinstance(value, list):  # numbers joined with ';'
        return len(cell.split(";")) == len(value) and all(
            same(part, item) for part, item in zip(cell.split(";"), value)
        )
    return cell == str(value)


def test_eval_csv_markdown_and_latex_say_what_json_says(stdout_of):
    args = ["eval", "--n", 4, "--methods", "vanilla,asap", "-k", 64]
    expected = [flat(row) for row in json.loads(stdout_of(*args, "--json"))["results"]]
    rows = list(csv.DictReader(io.StringIO(stdout_of(*args, "--format", "csv"))))
    assert [list(row) for row in rows] == [list(row) for row in expected]
    assert all(same(row[key], value) for row, want in zip(rows, expected, strict=True) for key, value in want.items())
    table = markdown_rows(stdout_of(*args, "--format", "markdown"))
    assert [row["method"] for row in table] == ["vanilla", "asap"] and table[0]["k"] == "-"
    interval = [float(bound) for bound in table[1]["average_ci95"].split(";")]  # each bound to 4 digits, as any number
    assert interval == [float(f"{bound:.4g}") for bound in expected[1]["average_ci95"]]
    latex = stdout_of(*args, "--format", "latex").splitlines()
    assert latex[0] == r"\begin{tabular}{" + "l" * len(expected[0]) + "}" and latex[-1] == r"\end{tabular}"
    assert len([line for line in latex if line.endswith(r"\\")]) == 1 + len(expected)
    assert r"accuracy.colour" in latex[1] and r"region\_accuracy.top" in latex[1]  # escaped for LaTeX


def test_profile_csv_has_a_row_per_json_row(llava_path, stdout_of):
    args = ["profile", "-m", llava_path, "-k", 16, "--repeats", 1, "--warmup", 0, "--decode-tokens", 1]
    expected = [json.loads(line) for line in stdout_of(*args, "--json").splitlines()]
    rows = list(csv.DictReader(io.StringIO(stdout_of(*args, "--format", "csv"))))
    assert [(row["method"], row["kept_tokens"]) for row in rows] == [
        (record["method"], str(record["kept_tokens"])) for record in expected
    ]
    assert len(rows[0]["prefill_seconds_all"].split(";")) == 1  # one repeat


def test_flops_markdown_is_vanilla_the_stages_and_the_total(stdout_of):
    expected = json.loads(stdout_of("flops", "-m", "llava-1.5-7b", "-k", 128, "--layer", 2, "--json"))
    table = markdown_rows(stdout_of("flops", "-m", "llava-1.5-7b", "-k", 128, "--layer", 2, "--format", "markdown"))
    assert [row["layers"] for row in table] == ["vanilla", "0-1", "2-31", "total"]
    assert [row["tokens"] for row in table] == ["576", "576", "128", "-"]
    assert float(table[-1]["flops_ratio"]) == pytest.approx(expected["flops_ratio"], abs=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [(["--format", "xml"], "'xml' is not one of table, json, csv, markdown, latex"),
     (["--format", "csv", "--json"], "--json and --format csv ask for two formats")],
)  # fmt: skip
def test_format_usage_errors(extra, message, asap):
    result = asap("flops", "-m", "llava-1.5-7b", *extra)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize("output", [["--json"], ["--format", "csv"], []])
def test_a_reader_that_stops_early_ends_the_command_quietly(output):
    """`asap flops ... | head -1`: no Error line, no traceback, the exit status of cat's."""
    import subprocess
    import sys

    # More than a pipe holds (64 KiB; the table of 3,000 rows is 150 KB): the writer is still
    # writing when the reader goes, whatever the machine's speed (399 rows fitted: a race).
    budgets = ",".join(str(k) for k in range(1, 3000))
    command = [sys.executable, "-m", "asapcli", "flops", "-m", "llava-1.5-7b", "--visual-tokens", "5000", "-k", budgets,
               *output]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()  # what head does once it has its line
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == b""
