"""`asap eval` and `asap run --save-kept`: accuracy tables, plots, and the kept-patch picture."""

import json
from pathlib import Path

import pytest
from PIL import Image

from asapcli.commands import options
from asapcli.demo import scenes
from asapcli.engine.cost import VisualFlops
from asapcli.engine.settings import PruneSettings
from asapcli.measure import evaluation, questions
from asapcli.report import figures


def test_eval_json_has_every_method_and_budget(tmp_path, asap):
    plot, profile = tmp_path / "accuracy.png", tmp_path / "attention.png"
    result = asap(
        "eval",
        "--n",
        8,
        "--methods",
        "vanilla,fastv,random,asap",
        "-k",
        "128,64",
        "--json",
        "--plot",
        plot,
        "--attention-profile",
        profile,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = [(row["method"], row["k"]) for row in data["results"]]
    assert rows == [("vanilla", None)] + [(m, k) for k in (128, 64) for m in ("fastv", "random", "asap")]
    for row in data["results"]:
        assert row["questions"] == 8
        assert set(row["accuracy"]) == set(scenes.QUESTION_TYPES)
        assert all(0 <= value <= 1 for value in row["accuracy"].values())
    by_k = {row["k"]: row["flops_ratio"] for row in data["results"]}
    assert by_k[None] == 1.0 and 0 < by_k[64] < by_k[128] < 1
    attention = data["attention_profile"]
    assert len(attention["causal"]) == len(attention["sg_bimask"]) == 24  # one value per image row
    assert 0 < sum(attention["causal"]) <= 1 + 1e-6  # the image's share of one softmax row
    assert Image.open(plot).format == "PNG" and Image.open(profile).format == "PNG"


def test_eval_in_batches_scores_as_one_at_a_time(asap):
    args = ["eval", "--n", 12, "--methods", "vanilla,random,asap", "-k", 64, "--json"]
    single, batched = asap(*args, "--batch", 1), asap(*args, "--batch", 5)  # the last batch holds 2
    assert single.exit_code == 0 and batched.exit_code == 0, single.output + batched.output
    assert json.loads(batched.stdout)["results"] == json.loads(single.stdout)["results"]


def test_eval_table_and_a_question_file(tmp_path, asap):
    data = tmp_path / "questions.jsonl"
    scenes.questions(7, 1)[0].scene.render().save(tmp_path / "scene.png")
    data.write_text('{"image": "scene.png", "question": "is there a red car?", "answer": "No."}\n\n')
    result = asap("eval", "--data", data, "--methods", "vanilla,asap", "-k", 64)
    assert result.exit_code == 0, result.output
    assert "vanilla" in result.stdout and "asap" in result.stdout and "n=1" in result.stdout


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", ":1: not JSON"),
        ('{"image": "scene.png", "question": "hi"}', ":1: missing or empty answer"),
        ('{"image": "gone.png", "question": "hi", "answer": "no"}', "image not found"),
        ("[1, 2]", "expected an object"),
        ('{"image": "scene.png", "question": "h\udcffi", "answer": "no"}', ":1: not UTF-8 text"),
    ],
)
def test_bad_question_files_are_one_error_line(tmp_path, line, message, asap):
    data = tmp_path / "questions.jsonl"
    data.write_bytes(line.encode("utf-8", "surrogateescape") + b"\n")
    result = asap("eval", "--data", data)
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_scoring_and_rows():
    assert evaluation.correct(" Red.", "red") and not evaluation.correct("red car", "red")
    grid = options.EvalComparison(methods="vanilla,fastv,asap", budgets="64,192").grid(None)
    rows = evaluation.runs(grid, num_layers=4)
    assert [(row.method.name, row.k) for row in rows][1:] == [
        ("fastv", 192),
        ("asap", 192),
        ("fastv", 64),
        ("asap", 64),
    ]
    score = evaluation.Score(PruneSettings())
    for kind, region, hit in (("colour", "top", True), ("colour", "bottom", False), ("exists", None, True)):
        score.add(questions.Item(None, "q", "a", kind, region), hit, VisualFlops(1.0 if hit else 3.0, 4.0))
    assert score.accuracy() == {"colour": 0.5, "exists": 1.0} and score.average == 0.75
    assert score.flops_ratio == 5 / 12  # the ratio of the sums, not the mean of 1/4, 3/4, 1/4
    assert score.region_accuracy() == {"top": 1.0, "bottom": 0.0}


@pytest.mark.parametrize(
    "method, k, expected", [("asap", 64, 64), ("fastv", 128, 128), ("random", 10, 10), ("vanilla", 64, 576)]
)
def test_save_kept_draws_exactly_the_kept_patches_undimmed(tmp_path, monkeypatch, method, k, expected, asap):
    image = tmp_path / "scene.png"
    scenes.questions(3, 1)[0].scene.render().save(image)
    drawn = []
    draw = figures.draw_kept
    monkeypatch.setattr(figures, "draw_kept", lambda picture, view: drawn.append(view) or draw(picture, view))
    kept = tmp_path / "kept.png"
    result = asap(
        "run", image, "what colour is the car?", "--method", method, "-k", k, "--save-kept", kept, "--max-tokens", 2
    )
    assert result.exit_code == 0, result.output
    (grid,) = drawn[0].grids
    lit = [state for row in grid.states for state in row if state not in (figures.DROPPED, figures.ABSORBED)]
    assert len(lit) == expected
    assert Image.open(kept).format == "PNG"


def test_save_kept_never_writes_over_an_input_and_replaces_other_files(tmp_path, asap):
    image = tmp_path / "scene.png"
    scenes.questions(3, 1)[0].scene.render().save(image)
    before = image.read_bytes()
    result = asap("run", image, "what colour?", "--save-kept", image, "--max-tokens", 1)
    assert result.exit_code == 2 and "it is an input of this run" in result.stderr
    assert image.read_bytes() == before
    kept = tmp_path / "kept.png"
    kept.write_text("an older file")  # an output that exists is replaced (README: outputs), and said so
    result = asap("run", image, "what colour?", "--save-kept", kept, "--max-tokens", 1)
    assert result.exit_code == 0, result.output
    assert Image.open(kept).format == "PNG" and f"wrote {kept}" in result.stderr


def test_eval_never_writes_over_its_question_file(tmp_path, asap):
    data = tmp_path / "questions.jsonl"
    scenes.questions(7, 1)[0].scene.render().save(tmp_path / "scene.png")
    data.write_text('{"image": "scene.png", "question": "is there a red car?", "answer": "No."}\n')
    for option in ("--plot", "--log", "--attention-profile"):
        result = asap("eval", "--data", data, "--methods", "vanilla,fastv", option, data)
        assert result.exit_code == 2 and "it is an input of this run" in result.stderr
    result = asap("eval", "--data", data, "--methods", "vanilla,fastv", "--plot", tmp_path / "scene.png")
    assert result.exit_code == 2 and "it is an input of this run" in result.stderr
    assert data.read_text().startswith('{"image": "scene.png"') and Image.open(tmp_path / "scene.png").format == "PNG"
    twice = tmp_path / "out.png"  # two outputs in one file: the second would replace the first
    result = asap("eval", "--data", data, "--methods", "vanilla,fastv", "--plot", twice, "--log", twice)
    assert result.exit_code == 2 and "must name different files" in result.stderr


def test_an_output_that_cannot_be_written_fails_before_the_run(tmp_path, asap):
    result = asap("eval", "--n", 2, "--methods", "vanilla,fastv", "--plot", "/dev/full")
    assert result.exit_code == 1 and result.stderr == "Error: cannot write /dev/full: not a regular file\n"


def test_a_failed_write_after_the_run_loses_only_that_file(tmp_path, monkeypatch, asap):
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"the previous plot")

    class FullDisk:
        def savefig(self, file, **options):
            file.write(b"half a")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "draw_accuracy", lambda *args: FullDisk())
    result = asap("eval", "--n", 2, "--methods", "vanilla,asap", "-k", 64, "--plot", plot)
    assert result.exit_code == 1
    assert "vanilla" in result.stdout and "asap" in result.stdout  # the table came first
    assert result.stderr.strip().endswith(f"Error: cannot write {plot}: No space left on device")
    assert plot.read_bytes() == b"the previous plot" and list(tmp_path.iterdir()) == [plot]


def test_interrupted_eval_prints_what_was_answered_and_keeps_the_log(tmp_path, monkeypatch, asap):
    calls = []
    answer = evaluation.generate_batch

    def interrupted_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return answer(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_batch", interrupted_on_the_third)
    log = tmp_path / "answers.jsonl"
    result = asap("eval", "--n", 4, "--methods", "vanilla,asap", "-k", 64, "--log", log)
    assert result.exit_code == 130
    assert "(partial)" in result.stdout and "Partial: interrupted after 2 of 8 answers" in result.stdout
    assert "vanilla" in result.stdout and "asap" in result.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["method"], r["k"], r["index"]) for r in records] == [("vanilla", None, 0), ("asap", 64, 0)]
    assert records[0]["expected"] == scenes.questions(scenes.EVAL_SEED, 1)[0].answer


def test_every_image_of_a_question_file_opens_before_the_first_answer(tmp_path, asap):
    scenes.questions(7, 1)[0].scene.render().save(tmp_path / "scene.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    line = '{"image": "%s", "question": "is there a red car?", "answer": "No."}\n'
    data = tmp_path / "questions.jsonl"
    data.write_text(line % "scene.png" * 4 + line % "broken.png")
    result = asap("eval", "--data", data, "--methods", "vanilla")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"Error: {data}:5: cannot read image")


def test_synthetic_questions_render_their_scenes_only_when_asked(monkeypatch):
    rendered = []
    render = scenes.Scene.render
    monkeypatch.setattr(scenes.Scene, "render", lambda self: rendered.append(1) or render(self))
    items = questions.synthetic_items(50)
    assert rendered == []  # --n 1000000 does not build a million pictures up front
    assert items[3].picture().size == render(scenes.questions(scenes.EVAL_SEED, 4)[3].scene).size
    assert len(rendered) == 1


def test_synthetic_questions_are_bounded(monkeypatch, asap):
    monkeypatch.setattr(questions, "MAX_SYNTHETIC", 10)
    result = asap("eval", "--n", 11)
    assert result.exit_code == 2 and result.stderr == "Error: --n is at most 10 for the synthetic questions, got 11\n"


def test_the_image_placeholder_in_a_question_is_refused_before_the_first_answer(tmp_path, asap):
    scenes.questions(7, 1)[0].scene.render().save(tmp_path / "scene.png")
    line = '{"image": "scene.png", "question": "%s", "answer": "No."}\n'
    data = tmp_path / "questions.jsonl"
    data.write_text(line % "is there a red car?" + line % "<image> is there a car?")
    result = asap("eval", "--data", data, "--methods", "vanilla")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: question 2: the text contains '<image>'")
    result = asap("profile", "--prompt", "what <image>?", "--methods", "vanilla")
    assert result.exit_code == 2 and "contains '<image>'" in result.stderr


def test_a_method_named_twice_runs_once_and_a_byte_order_mark_is_fine(tmp_path, asap):
    Path(tmp_path / "car.png").write_bytes((Path(__file__).parent.parent / "examples" / "car.png").read_bytes())
    line = json.dumps({"image": "car.png", "question": "what colour is the car?", "answer": "red"})
    (tmp_path / "q.jsonl").write_text(line + "\n", encoding="utf-8-sig")  # as Notepad saves it
    result = asap("eval", "--data", tmp_path / "q.jsonl", "--methods", "fastv,fastv", "-k", 64, "--json")
    assert result.exit_code == 0, result.output
    assert [row["method"] for row in json.loads(result.stdout)["results"]] == ["fastv"]


def test_eval_off_a_terminal_says_how_far_it_is(monkeypatch, asap):
    """A pipe or a CI log gets plain progress lines on stderr, never minutes of silence."""
    monkeypatch.setattr("asapcli.report.display.PLAIN_PROGRESS_SECONDS", 0.0)
    result = asap("eval", "--n", 3, "--methods", "fastv", "-k", 64, "--json")
    assert result.exit_code == 0, result.output
    lines = [line.split(" (")[0] for line in result.stderr.splitlines()]
    assert lines == ["Answers: 1/3", "Answers: 2/3", "Answers: 3/3"]


def test_a_picture_is_written_in_the_format_its_name_says(image_file, tmp_path, asap):
    result = asap("run", image_file, "what?", "--save-kept", tmp_path / "kept.jpg", "--max-tokens", 2)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "kept.jpg").format == "JPEG"
    result = asap("run", image_file, "what?", "--save-kept", tmp_path / "kept.gif", "--max-tokens", 2)
    assert result.exit_code == 2 and "name it .png, .svg, .pdf, .jpg or .webp" in result.stderr
    assert not (tmp_path / "kept.gif").exists()


def test_every_cell_has_a_95_percent_interval(asap):
    from asapcli.measure.evaluation import wilson

    # Wilson's interval, by hand: centre (p + z^2/2n) / (1 + z^2/n), half-width as in its formula.
    assert wilson(0, 10) == pytest.approx([0.0, 0.27753], abs=1e-5)
    assert wilson(10, 10) == pytest.approx([0.72247, 1.0], abs=1e-5)
    assert wilson(5, 10) == pytest.approx([0.23659, 0.76341], abs=1e-5)
    result = asap("eval", "--n", 8, "--methods", "vanilla,fastv", "-k", 64, "--json")
    assert result.exit_code == 0, result.output
    for row in json.loads(result.stdout)["results"]:
        for kind, (low, high) in row["accuracy_ci95"].items():
            assert low <= row["accuracy"][kind] <= high and high - low > 0.2  # 2 questions a type: wide
        low, high = row["average_ci95"]
        assert low <= row["average"] <= high and high - low > 0.05  # never 100.0±0.0 over 8 questions
    table = asap("eval", "--n", 8, "--methods", "vanilla", "-k", 64)
    assert "95% interval" in table.stdout
    assert " 95% " in table.stdout.splitlines()[1] and "67.1-100.0" in table.stdout  # Wilson's, capped: asymmetric


def test_short_n_and_log_samples_spell_n_and_log(tmp_path, asap):
    result = asap("eval", "-n", 2, "--methods", "vanilla", "--log-samples", tmp_path / "samples.jsonl", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 2
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_questions_to_a_real_model_ask_for_a_short_answer(tmp_path, llava_path, monkeypatch, asap):
    """LLaVA's convention, so that exact match does not score 'The car is red.' as wrong; not for
    the demo model, whose tokenizer knows none of its words; --prompt-suffix sets another."""
    asked = []
    build = evaluation.build_batch_inputs
    monkeypatch.setattr(
        evaluation, "build_batch_inputs", lambda processor, samples: asked.append(samples) or build(processor, samples)
    )
    Path(tmp_path / "car.png").write_bytes((Path(__file__).parent.parent / "examples" / "car.png").read_bytes())
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "car.png", "question": "what colour?", "answer": "red"}))
    for extra, prompt in [
        ([], "what colour?\nAnswer the question using a single word or phrase."),
        (["--prompt-suffix", ""], "what colour?"),
        (["--prompt-suffix", "One word."], "what colour?\nOne word."),
    ]:
        asked.clear()
        result = asap("eval", "-m", llava_path, "--data", tmp_path / "q.jsonl", "--methods", "vanilla", *extra)
        assert result.exit_code == 0, result.output
        assert asked[0][0][0] == prompt
    asked.clear()
    assert asap("eval", "-n", 1, "--methods", "vanilla").exit_code == 0
    assert "\n" not in asked[0][0][0]  # the demo model: the question alone


def test_the_table_reads_at_80_columns(monkeypatch, asap):
    """What does not fit goes on in a second part under the method and k (no cell cut)."""
    from asapcli.report import display

    monkeypatch.setattr(display.out, "width", 80)
    result = asap("eval", "-n", 4, "--methods", "vanilla,asap-bimask-only,asap", "-k", 128)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rules = [index for index, line in enumerate(lines) if line.startswith("─")]
    header = [word for rule in rules for word in lines[rule - 1].split() if word not in ("method", "k")]
    assert header == ["FLOPs", "col", "shape", "exist", "pos", "avg", "95%", "rel", "top", "bot"]
    for rule in rules:
        rows = [line.split() for line in lines[rule + 1 : rule + 4]]
        assert [row[:2] for row in rows] == [["vanilla", "-"], ["asap-bimask-only", "128"], ["asap", "128"]]
    assert all(len(line) <= 80 for line in lines[: rules[-1] + 4]) and "…" not in result.stdout
