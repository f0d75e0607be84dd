"""lmms-eval's model `asap` (asapcli/lmms_eval/): its --model_args read as asap's own options, the
offline task asap_demo as the demo model's held-out questions, and lmms-eval's real command line
on that task giving, question by question, the answers and exact-match scores of `asap eval`.
The runs through lmms-eval need the `eval` extra and are skipped without it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from asapcli.errors import UsageError
from asapcli.lmms_eval import TASKS, demo_task
from asapcli.lmms_eval.arguments import ModelArgs
from asapcli.measure.questions import read_items, synthetic_items
from asapcli.runtime.loading import load

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = TASKS / "asap_demo" / demo_task.QUESTION_FILE


def needs_lmms_eval(test):
    """lmms-eval's own CLI: the second test command of the README runs these (`-m lmms_eval`, with the
    `eval` extra); the core run deselects them (pyproject's addopts) and skips them where lmms-eval
    is missing."""
    installed = importlib.util.find_spec("lmms_eval") is not None
    skip = pytest.mark.skipif(not installed, reason='lmms-eval is not installed (pip install -e ".[eval]")')
    return pytest.mark.lmms_eval(skip(test))


def test_model_args_are_read_as_asap_reads_its_options():
    args = ModelArgs.parse(
        {"pretrained": "demo", "method": "asap", "k": 64, "layer": 2, "seed": 3, "lambda_max": 1, "merge_threshold": 0.9,
         "score_queries": "text", "dtype": "float32", "threads": 1}
    )  # fmt: skip
    assert (args.pretrained, args.method, args.k, args.layer, args.seed) == ("demo", "asap", 64, 2, 3)
    assert args.options == {"lambda_max": 1.0, "merge_threshold": 0.9, "score_queries": "text"}
    assert (args.device, args.dtype, args.device_map, args.threads) == ("auto", "float32", None, 1)
    assert ModelArgs.parse({"pretrained": "demo"}).threads is None  # the CLI's default rule (machine.choose_threads)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"k": "abc"}, "k needs a whole number of at least 1, got 'abc'"),
        ({"k": 0}, "k needs a whole number"),
        ({"k": 1.5}, "k needs a whole number"),
        ({"k": True}, "k needs a whole number"),  # lmms-eval reads k=true as True
        ({"layer": "two"}, "layer needs a whole number"),
        ({"threads": 0}, "threads needs a whole number of at least 1"),
        ({"method": "fastvv"}, "'fastvv' is not one of vanilla, asap"),
        ({"lambda_max": 2.0}, "lambda-max must be in (0, 1]"),
        ({"lambda_max": "high"}, "lambda-max needs a number"),
        ({"score_queries": "first"}, "score-queries must be one of last, text, all"),
        ({"method": "fastv", "merge_threshold": 0.9}, "--merge-threshold is not an option of fastv"),
        ({"positions": "renumber"}, "--positions renumber is for methods that shorten the sequence they feed on"),
        ({"topk": 64}, "asap takes no topk; it takes pretrained, method, k, flops, layer"),
    ],
)
def test_a_bad_model_arg_is_asaps_usage_error(given, message):
    with pytest.raises(UsageError) as error:
        ModelArgs.parse({"pretrained": "demo", **given})
    assert message in str(error.value)


def test_k_and_layer_default_to_the_presets_and_are_checked_against_the_model():
    loaded = load("demo", device="cpu")
    settings = ModelArgs.parse({"pretrained": "demo", "method": "fastv"}).settings(loaded)
    assert (settings.k, settings.layer) == (loaded.preset.k, loaded.preset.layer)
    with pytest.raises(UsageError, match=f"layer must be in 1..{loaded.num_layers - 1}"):
        ModelArgs.parse({"pretrained": "demo", "layer": 99}).settings(loaded)


def test_the_shipped_demo_task_is_the_demo_models_held_out_questions(tmp_path):
    """The files in the package are what demo_task.write() makes now, and `asap eval --data` reads
    them as the same questions about the same pixels as its synthetic held-out set."""
    demo_task.write(tmp_path)
    assert (tmp_path / demo_task.QUESTION_FILE).read_text() == QUESTIONS.read_text()
    shipped = read_items(QUESTIONS)
    assert len(shipped) == demo_task.QUESTIONS
    for item, held_out in zip(shipped, synthetic_items(demo_task.QUESTIONS), strict=True):
        assert (item.question, item.answer, item.type) == (held_out.question, held_out.answer, held_out.type)
        assert item.picture().tobytes() == held_out.picture().tobytes()
        assert Image.open(tmp_path / item.image.relative_to(QUESTIONS.parent)).tobytes() == item.picture().tobytes()


LIMIT = 8
RUNS = {"vanilla": "method=vanilla", "asap": "method=asap,k=4,layer=2"}  # k=4 gets question 3 wrong


@needs_lmms_eval
def test_lmms_eval_answers_each_question_as_asap_eval(tmp_path, asap):
    """One lmms-eval process (its --config runs each entry in turn) evaluates vanilla, asap, and
    a run whose layer the model turns out not to have (what only the loaded model tells: a bad k
    would refuse the whole --config first); `asap eval` answers the same questions in this process."""
    runs = [
        {"model": "asap", "model_args": f"pretrained=demo,{args}", "tasks": "asap_demo", "limit": LIMIT,
         "batch_size": 1, "log_samples": True, "output_path": str(tmp_path / name)}
        for name, args in {**RUNS, "bad": "method=asap,layer=9"}.items()
    ]  # fmt: skip
    (tmp_path / "runs.yaml").write_text(json.dumps(runs))  # JSON is YAML
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "OMP_NUM_THREADS": "1",  # as asap eval --threads 1 below: the same arithmetic
    }
    lmms_eval = subprocess.run(
        [sys.executable, "-m", "asapcli.lmms_eval", "--config", str(tmp_path / "runs.yaml")],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    # lmms-eval exits 0 whatever failed; the launcher says which run failed, with asap's message.
    assert lmms_eval.returncode == 1, lmms_eval.stdout[-3000:] + lmms_eval.stderr[-3000:]
    assert "Error: layer must be in 1..3 for this model (4 decoder layers), got 9" in lmms_eval.stderr
    assert not list((tmp_path / "bad").glob("**/*_results.json"))

    log = tmp_path / "asap-eval.jsonl"
    asap_eval = asap("eval", "--data", QUESTIONS, "-n", LIMIT, "--methods", "vanilla,asap", "-k", "4", "--layer", "2", "--threads", "1", "--log-samples", log)  # fmt: skip
    assert asap_eval.exit_code == 0, asap_eval.output
    expected = [json.loads(line) for line in log.read_text().splitlines()]

    for name in RUNS:
        (results_file,) = (tmp_path / name).glob("*/*_results.json")
        (samples_file,) = (tmp_path / name).glob("*/*_samples_asap_demo.jsonl")
        samples = sorted(
            (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
        )
        ours = [record for record in expected if record["method"] == name]
        assert [s["doc_id"] for s in samples] == [record["index"] for record in ours] == list(range(LIMIT))
        for sample, record in zip(samples, ours, strict=True):
            assert sample["input"] == record["question"]  # the prompt text, before the chat template
            assert (sample["filtered_resps"], sample["exact_match"]) == (record["answer"], float(record["correct"]))
        accuracy = json.loads(results_file.read_text())["results"]["asap_demo"]["exact_match,none"]
        assert accuracy == sum(record["correct"] for record in ours) / LIMIT
    # The comparison has teeth: pruning to 4 tokens loses a question that vanilla answers.
    assert [r["correct"] for r in expected if r["method"] == "asap"] != [
        r["correct"] for r in expected if r["method"] == "vanilla"
    ]


@needs_lmms_eval
def test_bad_model_args_on_the_command_line_are_one_error_line_before_lmms_eval_starts():
    """lmms-eval printed its own 20-30 line traceback before asap's message, and exited 1."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "asapcli.lmms_eval", "--model", "asap", "--model_args", "pretrained=demo,k=0",
         "--tasks", "asap_demo", "--limit", "1"],
        capture_output=True, text=True, env=environment, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "Error: model_args: k needs a whole number of at least 1, got '0'\n"


@needs_lmms_eval
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_args", "pretrained=demo,device_map=bogus"], "model_args: device_map takes auto, balanced"),
        (["--model_args", "pretrained=demo,dtype=float64"], "model_args: unknown dtype 'float64'"),
        (["--model_args", '{"pretrained": "demo"}'], "model_args: write key=value pairs separated by commas"),
        (["--model_args", "=4"], "model_args: '=4': each item is key=value"),
        (["--model_args", "pretrained=demo,k=4,k=8"], "model_args: k given more than once"),
        (["--batch_size", "0"], "--batch_size needs a whole number of at least 1, got '0'"),
        (["--config", "<bad.yaml>"], "--config <bad.yaml>: not a YAML file lmms-eval can read"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
        (["--config", "<k.yaml>"], "--config <k.yaml>: model_args: k needs a whole number of at least 1, got 'abc'"),
        (["--gen_kwargs", "num_beams=2"], "gen_kwargs num_beams=2: the asap model decodes greedily or by sampling"),
        (["--gen_kwargs", "num_beams=two"], "gen_kwargs num_beams needs a whole number of at least 1, got 'two'"),
        (
            ["--config", "<mapping.yaml>"],
            "--config <mapping.yaml>: model_args must be key=value text (pretrained=demo,k=64), got dict",
        ),
        (["--config", "<llava.yaml>", "--gen_kwargs", "num_beams=3"], "gen_kwargs num_beams=3"),
        (
            ["--config", "<llava.yaml>", "--model_args", "pretrained=demo,method=nope"],
            "model_args: 'nope' is not one of vanilla, asap",
        ),
        (["--output_path", "/dev/full"], "--output_path /dev/full: /dev/full is not a folder"),
        (["--output_path", "<read-only>/results"], "--output_path <read-only>/results: <read-only> is not writable"),
    ],
)
def test_what_lmms_eval_would_fail_on_late_is_refused_first(tmp_path, monkeypatch, capsys, argv, message):
    """Each of these printed lmms-eval's traceback, ran the wrong thing (k=8 of k=4,k=8) or exited 0
    after a run whose results were lost."""
    import asapcli.lmms_eval.__main__ as launcher

    (tmp_path / "bad.yaml").write_text("a: [b\n")
    (tmp_path / "k.yaml").write_text("- model: asap\n  model_args: pretrained=demo,k=abc\n  tasks: asap_demo\n")
    (tmp_path / "mapping.yaml").write_text("model: asap\nmodel_args:\n  pretrained: demo\ntasks: asap_demo\n")
    (tmp_path / "llava.yaml").write_text("model: asap\nmodel_args: pretrained=demo\ntasks: asap_demo\n")
    (tmp_path / "read-only").mkdir(mode=0o555)
    if os.access(tmp_path / "read-only", os.W_OK) and "read-only" in message:
        pytest.skip("running as a user who may write anywhere")

    def fill(text: str) -> str:
        for name in ("bad.yaml", "k.yaml", "mapping.yaml", "llava.yaml", "read-only"):
            text = text.replace(f"<{name}>", str(tmp_path / name))
        return text

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["asapcli.lmms_eval", "--model", "asap", "--tasks", "asap_demo",
                                      *map(fill, argv)])  # fmt: skip
    monkeypatch.setattr("lmms_eval.__main__.cli_evaluate", lambda args: pytest.fail("lmms-eval started"))
    assert launcher.main() == 2
    assert capsys.readouterr().err.startswith(f"Error: {fill(message)}")


@needs_lmms_eval
def test_a_model_that_cannot_load_is_one_error_line_before_lmms_eval_starts(monkeypatch, capsys):
    """The README's hub command offline printed lmms-eval's 30-line traceback of the load first."""
    import asapcli.lmms_eval.__main__ as launcher

    monkeypatch.setattr(sys, "argv", ["asapcli.lmms_eval", "--model", "asap", "--tasks", "asap_demo",
                                      "--model_args", "pretrained=nobody/no-such-model"])  # fmt: skip
    monkeypatch.setattr("lmms_eval.__main__.cli_evaluate", lambda args: pytest.fail("lmms-eval started"))
    assert launcher.main() == 1  # conftest sets HF_HUB_OFFLINE=1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("Error: model 'nobody/no-such-model' is not in the local Hugging Face cache")
    assert "pretrained=FOLDER under lmms-eval" in line


@needs_lmms_eval
def test_ctrl_c_in_lmms_eval_is_one_line_and_status_130(monkeypatch, capsys):
    import asapcli.lmms_eval.__main__ as launcher

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["asapcli.lmms_eval", "--model", "asap", "--tasks", "asap_demo"])
    monkeypatch.setattr("lmms_eval.__main__.cli_evaluate", interrupted)
    assert launcher.main() == 130
    assert capsys.readouterr().err == "Error: interrupted\n"


@needs_lmms_eval
def test_an_answer_is_cut_at_the_first_stop_string():
    """N45: the answer up to the first of the task's stop strings, wherever each occurs."""
    from asapcli.lmms_eval.model import _cut

    assert _cut("red. It is a car. Yes.", ["."]) == "red"
    assert _cut("red\nIt is. a car", [".", "\n"]) == "red"
    assert _cut("red", []) == "red"


@needs_lmms_eval
def test_results_lmms_eval_could_not_save_fail_the_run():
    """A full disk under --output_path: lmms-eval warned "Could not save sample results" and exited 0."""
    from types import SimpleNamespace

    from asapcli.lmms_eval.__main__ import _note_failure

    def record(level, name, message):
        return {"level": SimpleNamespace(name=level), "name": name, "message": message}

    failures: list[str] = []
    tracker = "lmms_eval.loggers.evaluation_tracker"
    _note_failure(record("INFO", tracker, "Saving results aggregated"), failures)
    _note_failure(record("WARNING", tracker, "Could not save sample results"), failures)
    _note_failure(record("INFO", tracker, "OSError(28, 'No space left on device')"), failures)
    _note_failure(record("INFO", tracker, "Output path not provided, skipping saving results aggregated"), [])
    assert failures == [
        "lmms-eval could not save the sample results under --output_path (OSError(28, 'No space left on device'))"
    ]


@needs_lmms_eval
def test_two_data_parallel_processes_gather_what_one_process_answers(tmp_path):
    """docs/lmms-eval.md "Several GPUs", on two CPU processes: accelerate's launcher runs two gloo
    processes, each answers its share of the questions, and rank 0 gathers samples and a score
    equal to one process's (it was checked by hand only)."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "OMP_NUM_THREADS": "1",
    }
    task = ["--model", "asap", "--model_args", "pretrained=demo,method=asap,k=4,layer=2", "--tasks", "asap_demo",
            "--limit", str(LIMIT), "--batch_size", "1", "--log_samples"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    commands = {
        "one": [sys.executable, "-m", "asapcli.lmms_eval", *task, "--output_path", str(tmp_path / "one")],
        "two": [*launch, "-m", "asapcli.lmms_eval", *task, "--output_path", str(tmp_path / "two")],
    }
    found = {}
    for name, command in commands.items():
        done = subprocess.run(
            command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600, check=False
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        ranks = {"one": ["Running on rank 0"], "two": ["Running on rank 0", "Running on rank 1"]}[name]
        assert all(rank in done.stdout + done.stderr for rank in ranks)  # two processes, each a model of its own
        (results,) = (tmp_path / name).glob("*/*_results.json")
        (samples,) = (tmp_path / name).glob("*/*_samples_asap_demo.jsonl")
        rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda row: row["doc_id"])
        score = json.loads(results.read_text())["results"]["asap_demo"]["exact_match,none"]
        found[name] = ([(row["doc_id"], row["filtered_resps"], row["exact_match"]) for row in rows], score)
    assert [doc for doc, _, _ in found["two"][0]] == list(range(LIMIT))  # every question, gathered on rank 0
    assert found["two"] == found["one"]


@needs_lmms_eval
def test_the_command_lines_model_args_override_a_configs_as_lmms_eval_does(tmp_path, monkeypatch):
    """A config's bad k that the command line replaces is no refusal: lmms-eval runs the command line's."""
    import asapcli.lmms_eval.__main__ as launcher

    config = tmp_path / "c.yaml"
    config.write_text("model: asap\nmodel_args: pretrained=demo,k=0\ntasks: asap_demo\n")
    started = []
    monkeypatch.setattr(
        sys, "argv", ["asapcli.lmms_eval", "--config", str(config), "--model_args", "pretrained=demo,k=4"]
    )
    monkeypatch.setattr("lmms_eval.__main__.cli_evaluate", lambda args: started.append(args))
    assert launcher.main() == 0 and started


@needs_lmms_eval
def test_a_results_file_the_disk_cut_fails_the_run(tmp_path):
    """lmms-eval writes its results unclosed: on a full disk the file is empty and it exits 0."""
    import time

    from asapcli.lmms_eval.__main__ import _unreadable_results

    started = time.time() - 1
    argv = ["--model", "asap", "--output_path", str(tmp_path)]
    assert _unreadable_results(argv, started) == [f"lmms-eval wrote no results file under --output_path {tmp_path}"]
    results = tmp_path / "demo" / "20261206_results.json"
    results.parent.mkdir()
    results.write_text("")
    (message,) = _unreadable_results(argv, started)
    assert message.startswith(f"lmms-eval's results file {results} is empty or cut")
    results.write_text('{"results": {}}')
    assert _unreadable_results(argv, started) == [] and _unreadable_results([*argv, "--predict_only"], started) == []
