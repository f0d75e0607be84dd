"""Every command's --json output against asapcli.records: each object has exactly the fields of
its record (none missing, none extra), each value of the field's type; and docs/json.md lists
every record's fields."""

import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import pytest

from asapcli import records

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "json.md"


@pytest.fixture
def json_lines(asap):
    """The JSON objects `asap ARGS` printed, one per line, after checking that it succeeded."""

    def run(*args, input=None):
        result = asap(*args, input=input)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    return run


def conforms(value, kind, where="") -> None:
    """Raise AssertionError where `value` (as json.loads gave it) is not of type `kind`."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        _conforms_record(value, kind, where)
    elif origin in (typing.Union, types.UnionType):
        _conforms_union(value, typing.get_args(kind), where)
    elif origin in (list, dict):
        _conforms_container(value, origin, typing.get_args(kind), where)
    else:
        _conforms_scalar(value, kind, where)


def _conforms_record(value, kind, where: str) -> None:
    assert isinstance(value, dict), f"{where}: {value!r} is not an object"
    hints = typing.get_type_hints(kind)
    names = [field.name for field in dataclasses.fields(kind)]
    assert sorted(value) == sorted(names), f"{where}: keys {sorted(value)} != {kind.__name__}'s {sorted(names)}"
    for name in names:
        conforms(value[name], hints[name], f"{where}.{name}")


def _conforms_union(value, options, where: str) -> None:
    problems = []
    for option in options:
        try:
            return conforms(value, option, where)
        except AssertionError as problem:
            problems.append(str(problem))
    raise AssertionError("; ".join(problems))


def _conforms_container(value, origin, arguments, where: str) -> None:
    if origin is list:
        assert isinstance(value, list), f"{where}: {value!r} is not a list"
        for index, item in enumerate(value):
            conforms(item, arguments[0], f"{where}[{index}]")
        return
    assert isinstance(value, dict), f"{where}: {value!r} is not an object"
    for key, item in value.items():
        conforms(key, arguments[0], f"{where} key")
        conforms(item, arguments[1], f"{where}[{key!r}]")


def _conforms_scalar(value, kind, where: str) -> None:
    if kind is type(None):
        assert value is None, f"{where}: {value!r} is not null"
    elif kind is float:  # JSON does not tell 1 from 1.0
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    elif kind is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
    else:
        assert isinstance(value, kind), f"{where}: {value!r} is not {kind.__name__}"


@pytest.fixture
def second_image(tmp_path, images):
    path = tmp_path / "second.png"
    images[1].save(path)
    return path


def test_conforms_refuses_a_missing_an_extra_and_a_mistyped_key():
    good = {"layers": 2, "tokens": 8, "tflops": 0.5}
    conforms(good, records.FlopsStage)
    for bad in ({"layers": 2, "tokens": 8}, {**good, "ratio": 1.0}, {**good, "tokens": "8"}, {**good, "layers": True}):
        with pytest.raises(AssertionError):
            conforms(bad, records.FlopsStage)


def test_run_json_is_answer_records(llava_path, image_file, second_image, json_lines):
    for record in json_lines("run", image_file, "what?", "-m", llava_path, "-k", 16, "--max-tokens", 2, "--json"):
        conforms(record, records.Answer, "run")
    batch = json_lines("run", image_file, second_image, "what?", "-m", llava_path, "--max-tokens", 2, "--json")
    assert len(batch) == 2
    for record in batch:
        conforms(record, records.Answer, "run (batch)")


def test_compare_json_is_a_compare_report(llava_path, image_file, json_lines):
    args = ["-m", llava_path, "--methods", "fastv,asap", "-k", 16, "--max-tokens", 2, "--json"]
    (report,) = json_lines("compare", image_file, "what?", *args)
    conforms(report, records.CompareReport, "compare")
    assert [answer["method"] for answer in report["answers"]] == ["vanilla", "fastv", "asap"]


def test_chat_json_is_turn_and_stats_records(llava_path, image_file, json_lines):
    lines = json_lines("chat", image_file, "-m", llava_path, "--max-tokens", 2, "--json", input="hi\nmore\n/stats\n")
    *turns, stats = lines
    assert len(turns) == 2
    for record in turns:
        conforms(record, records.ChatTurn, "chat")
    assert list(stats) == ["stats"]
    conforms(stats["stats"], records.ChatStats, "chat /stats")


def test_profile_json_is_profile_rows(llava_path, json_lines):
    fast = ["--repeats", 1, "--warmup", 0, "--decode-tokens", 2, "--batch", 2]
    rows = json_lines("profile", "-m", llava_path, "--methods", "vanilla,asap", "-k", 16, "--json", *fast)
    assert len(rows) == 4
    for record in rows:
        conforms(record, records.ProfileRow, "profile")


def test_eval_json_is_an_eval_report_and_its_log_logged_answers(tmp_path, json_lines):
    log = tmp_path / "answers.jsonl"
    args = ["--n", 2, "--methods", "vanilla,asap", "-k", 64, "--max-tokens", 3, "--log", log]
    (report,) = json_lines("eval", *args, "--attention-profile", tmp_path / "rows.png", "--json")
    conforms(report, records.EvalReport, "eval")
    assert report["attention_profile"] is not None and len(report["results"]) == 2
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 4
    for record in lines:
        conforms(record, records.LoggedAnswer, "eval --log")


def test_flops_json_is_a_flops_report(llava_path, json_lines):
    (analytic,) = json_lines("flops", "-m", "llava-next-7b", "--schedule", "2:960,16:480", "--json")
    conforms(analytic, records.FlopsReport, "flops")
    assert analytic["measured"] is None
    (measured,) = json_lines("flops", "-m", llava_path, "-k", 16, "--measure", "--json")
    conforms(measured, records.FlopsReport, "flops --measure")
    assert measured["measured"] is not None
    # where it was measured: the model's device and dtype when one ran, none for numbers alone
    assert (measured["environment"]["device"], measured["environment"]["dtype"]) == ("cpu", "float32")
    assert (analytic["environment"]["device"], analytic["environment"]["dtype"]) == (None, None)


def test_a_record_says_what_it_was_measured_with(llava_path, image_file, json_lines):
    import torch
    import transformers

    (answer,) = json_lines("run", image_file, "what?", "-m", llava_path, "--dtype", "bfloat16", "--max-tokens", 1,
                           "--threads", 1, "--json")  # fmt: skip
    found = answer["environment"]
    assert (found["torch"], found["transformers"]) == (torch.__version__, transformers.__version__)
    assert (found["device"], found["dtype"], found["threads"], found["gpu"]) == ("cpu", "bfloat16", 1, None)
    assert found["date"].endswith("+00:00") and found["date"][:4] >= "2025"


def test_env_json_is_an_environment_record_of_this_process(json_lines):
    import torch

    (found,) = json_lines("env", "--json")
    conforms(found, records.Environment, "env")
    assert (found["torch"], found["threads"]) == (torch.__version__, torch.get_num_threads())
    assert found["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_docs_list_every_record_and_its_fields():
    """One line per record in docs/json.md: `Name`: `key`, `key`, ... in order."""
    section = SCHEMA_DOC.read_text()
    for record in records.RECORDS:
        line = re.search(rf"^- `{record.__name__}`.*$", section, re.MULTILINE)
        assert line, f"docs/json.md lacks {record.__name__}"
        listed = re.findall(r"`(\w+)`", line.group(0).partition(":")[2])
        assert listed == [field.name for field in dataclasses.fields(record)], record.__name__


def test_models_lists_every_preset_with_what_it_needs(asap):
    from asapcli.runtime.presets import preset_names

    result = asap("models", "--json")
    assert result.exit_code == 0, result.output
    found = {record["name"]: record for record in map(json.loads, result.stdout.splitlines())}
    assert list(found) == preset_names()
    for record in found.values():
        conforms(record, records.PresetInfo, record["name"])
    assert (found["demo"]["weights"], found["demo"]["context"]) == ("bundled", 1024)
    assert (
        found["llava-1.5-7b"]["weights"] == "llava-hf/llava-1.5-7b-hf"
        and found["bench"]["weights"] == "architecture only"
    )
    assert found["llava-next-7b"]["family"] == "llava_next" and found["llava-next-7b"]["visual_tokens"] == 2880
    table = asap("models").stdout
    assert all(line.split()[0] in found for line in table.splitlines()[4 : 4 + len(found)])
