"""--format csv|markdown|latex on profile, eval and flops: CSV is the records, each parsed back to
what --json says; Markdown and LaTeX are the table a reader sees (Table 1's layout for eval), with
the same cells; a table wider than the terminal goes out in blocks of whole columns."""

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
    assert all(set(cell) <= set("-:") for cell in rule)
    return [dict(zip(header, line, strict=True)) for line in body]


def same(cell: str, value) -> bool:
    """A CSV cell against the JSON value it came from (every digit kept; null as empty)."""
    if value is None:
        return cell == ""
    if isinstance(value, bool):
        return cell == ("true" if value else "false")
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
    assert list(rows[0])[:3] == ["method", "k", "options.lambda_max"]  # vanilla has no options: asap's are in place
    assert [key for key in rows[1] if rows[1][key] != ""] == list(expected[1])
    assert all(same(row[key], value) for row, want in zip(rows, expected, strict=True) for key, value in want.items())
    table = markdown_rows(stdout_of(*args, "--format", "markdown"))  # Table 1: percent, intervals
    assert [row["method"] for row in table] == ["vanilla", "asap"] and table[0]["k"] == "-"
    asap_row = expected[1]
    low, high = asap_row["average_ci95"]
    assert (table[1]["avg"], table[1]["95%"]) == (
        f"{asap_row['average'] * 100:.1f}",
        f"{low * 100:.1f}-{high * 100:.1f}",
    )
    assert table[1]["FLOPs"] == f"{asap_row['flops_ratio'] * 100:.1f}" and table[1]["col"] != ""
    latex = stdout_of(*args, "--format", "latex").splitlines()
    assert latex[0] == r"\begin{tabular}{lrrrrrrrrrrr}" and latex[-1] == r"\end{tabular}"
    body = latex[latex.index(r"\midrule") + 1 : latex.index(r"\bottomrule")]
    assert [line.split("&")[0].strip() for line in body] == ["vanilla", "asap"]


def test_profile_csv_has_a_row_per_json_row(llava_path, stdout_of):
    args = ["profile", "-m", llava_path, "-k", 16, "--repeats", 1, "--warmup", 0, "--decode-tokens", 1]
    expected = [json.loads(line) for line in stdout_of(*args, "--json").splitlines()]
    rows = list(csv.DictReader(io.StringIO(stdout_of(*args, "--format", "csv"))))
    assert [(row["method"], row["kept_tokens"]) for row in rows] == [
        (record["method"], str(record["kept_tokens"])) for record in expected
    ]
    assert len(rows[0]["prefill_seconds_all"].split(";")) == 1  # one repeat


def test_flops_markdown_is_the_stages_then_vanilla_pruned_and_the_ratio(stdout_of):
    expected = json.loads(stdout_of("flops", "-m", "llava-1.5-7b", "-k", 128, "--layer", 2, "--json"))
    table = markdown_rows(stdout_of("flops", "-m", "llava-1.5-7b", "-k", 128, "--layer", 2, "--format", "markdown"))
    assert [row["stage"] for row in table] == ["0", "1", "vanilla", "pruned", "ratio"]
    assert [row["visual tokens"] for row in table[:3]] == ["576", "128", "576"]
    assert table[-1]["TFLOPs"] == f"{expected['flops_ratio']:.2%}"


def test_a_wide_table_goes_out_in_blocks_of_whole_columns():
    """At 60 columns no number breaks across lines: the columns that do not fit go in a second
    block, led again by the method and k."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "asapcli", "eval", "--n", "2", "--methods", "vanilla,asap-bimask-only", "-k", "64"]
    narrow = {**os.environ, "COLUMNS": "60"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=narrow, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    headers = [line.split() for line in lines if line.startswith("method")]
    assert len(headers) == 2 and headers[1][:2] == ["method", "k"]
    assert set(headers[0] + headers[1]) >= {"FLOPs", "col", "avg", "rel", "bot"}
    rows = [line for line in lines if line.startswith("asap-bimask-only")]
    assert len(rows) == 2 and all(len(line) <= 60 for line in rows)


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


def test_a_bar_in_a_markdown_cell_is_escaped(capsys):
    """A model folder named with '|' split its row into one cell too many."""
    from asapcli.report import display

    table = display.Shown("t", ["model", "k"])
    table.add_row("runs/a|b", "64")
    display.show(table, "markdown")
    assert [cell.strip() for cell in capsys.readouterr().out.splitlines()[2].split(" | ")] == ["| runs/a\\|b", "64 |"]


def test_a_pipe_in_a_question_type_stays_in_its_markdown_header(stdout_of, tmp_path):
    """A question type `a|b` split its header cell: 7 header cells over rows of 6."""
    from pathlib import Path

    car = Path(__file__).resolve().parent.parent / "examples" / "car.png"
    data = tmp_path / "pipe.jsonl"
    data.write_text(
        json.dumps({"image": str(car), "question": "what colour is the car?", "answer": "red", "type": "a|b"})
    )
    text = stdout_of("eval", "--data", data, "--methods", "vanilla", "--format", "markdown", "--threads", 1)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [len(line.replace("\\|", "").strip("|").split("|")) for line in lines]
    assert len(set(cells)) == 1 and "a\\|b" in lines[0]


def test_flops_csv_keeps_the_stages_and_writes_booleans_as_json_does(stdout_of):
    """It wrote Python's False and dropped the stage rows."""
    rows = list(
        csv.DictReader(
            io.StringIO(
                stdout_of("flops", "-m", "llava-1.5-7b", "--method", "pdrop", "-k", "64,128", "--format", "csv")
            )
        )
    )
    records = [
        json.loads(line)
        for line in stdout_of("flops", "-m", "llava-1.5-7b", "--method", "pdrop", "-k", "64,128", "--json").splitlines()
    ]
    for row, record in zip(rows, records, strict=True):
        assert row["random_weights"] == "false"
        for field in ("layers", "tokens", "tflops"):
            assert same(row[f"stages.{field}"], [stage[field] for stage in record["stages"]])
