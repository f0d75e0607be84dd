"""`asap run` end to end through the CLI on the tiny model: text, --json, and every user error."""

import json
import re
from pathlib import Path

import pytest
import torch

CAR = str(Path(__file__).resolve().parent.parent / "examples" / "car.png")


def test_run_streams_an_answer_and_a_summary(llava_path, image_file, asap):
    result = asap("run", image_file, "what colour?", "-m", llava_path, "-k", 16, "--max-tokens", 5)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # the (random-weight) answer
    assert "asap k=16 L=2: kept 16/64 visual tokens" in result.stderr
    assert "FLOPs" in result.stderr and "prefill" in result.stderr
    # A cold first call over at most 4 decoded tokens: said, and no decode rate made up from it.
    assert "(one sample, CPU, " in result.stderr  # a single timing, labelled as one, with its threads
    assert "first call: includes warm-up)" in result.stderr and "decode rate not shown (" in result.stderr
    assert "tokens generated; a rate needs 9)" in result.stderr


def test_run_json_is_one_object_with_the_figures(llava_path, image_file, asap):
    result = asap(
        "run", image_file, "what colour?", "-m", llava_path, "--method", "fastv", "-k", 16, "--json", "--max-tokens", 4
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "fastv" and data["k"] == 16 and data["layer"] == 2
    assert (data["visual_tokens"], data["kept_tokens"]) == (64, 16)
    expected_ratio = (
        2 * (4 * 64 * 64**2 + 2 * 64**2 * 64 + 3 * 64 * 64 * 128)
        + 2 * (4 * 16 * 64**2 + 2 * 16**2 * 64 + 3 * 16 * 64 * 128)
    ) / (4 * (4 * 64 * 64**2 + 2 * 64**2 * 64 + 3 * 64 * 64 * 128))
    assert data["flops_ratio"] == pytest.approx(expected_ratio)
    assert data["prefill_seconds"] > 0 and data["prefill_includes_warmup"] is True  # one call per process
    assert data["decode_tokens_per_second"] is None  # 3 decoded tokens or fewer: too few to time
    assert 1 <= data["generated_tokens"] <= 4 and isinstance(data["answer"], str)


def test_a_prompt_that_is_not_text_is_one_error_line(llava_path, image_file, asap):
    result = asap("run", image_file, "-", "-m", llava_path, input=b"what \xff is it?\n")
    assert result.exit_code == 1
    assert result.stderr == "Error: the input is not valid UTF-8 text; check the encoding of what you typed or piped\n"


def test_run_reads_the_prompt_from_stdin(llava_path, image_file, asap):
    result = asap("run", image_file, "-", "-m", llava_path, "--json", "--max-tokens", 2, input="what colour?\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] > 64


def test_k_at_least_the_visual_tokens_prunes_nothing_and_says_so(llava_path, image_file, asap):
    result = asap("run", image_file, "hi", "-m", llava_path, "-k", 64, "--max-tokens", 2)
    assert result.exit_code == 0, result.output
    assert "nothing pruned" in result.stderr


def test_vanilla_and_asap_agree_when_nothing_is_pruned(llava_path, image_file, asap):
    answers = []
    for extra in (["--method", "vanilla"], ["--method", "asap", "-k", 1000, "--lambda-max", 1.0]):
        result = asap("run", image_file, "what?", "-m", llava_path, "--json", "--max-tokens", 8, *extra)
        answers.append(json.loads(result.stdout)["answer"])
    assert answers[0] == answers[1]


def test_vanilla_summary_names_no_budget(llava_path, image_file, asap):
    result = asap("run", image_file, "what?", "-m", llava_path, "--method", "vanilla", "--max-tokens", 2)
    assert result.exit_code == 0, result.output
    assert "vanilla: all 64 visual tokens kept (no pruning)" in result.stderr and "k=" not in result.stderr


@pytest.fixture
def corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return path


@pytest.fixture
def model_without_image_token(tmp_path, llava_path):
    import shutil

    folder = tmp_path / "no-image-token"
    shutil.copytree(llava_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["{missing}", "hi", "-m", "{model}"], 1, "image not found"),
        (["{corrupt}", "hi", "-m", "{model}"], 1, "not an image format PIL can open"),
        (["{image}", "hi", "-m", "{model}", "-k", "0"], 2, "k needs a whole number of at least 1, got '0'"),
        (["{image}", "hi", "-m", "{model}", "--layer", "0"], 2, "layer must be at least 1"),
        (["{image}", "hi", "-m", "{model}", "--layer", "4"], 2, "layer must be in 1..3"),
        (["{image}", "hi", "-m", "{model}", "--lambda-max", "0"], 2, "lambda-max must be in (0, 1]"),
        (["{image}", "hi", "-m", "{model}", "--lambda-max", "1.5"], 2, "lambda-max must be in (0, 1]"),
        (["{image}", "   ", "-m", "{model}"], 2, "the prompt is empty"),
        (["{image}", "<image> hi", "-m", "{model}"], 2, "contains '<image>', this model's image placeholder"),
        (["{image}", "hi", "-m", "{model}", "--method", "magic"], 2, "'magic' is not one of vanilla, asap"),
        (["{image}", "hi", "-m", "{no_image_token}"], 1, "has no image_token_id"),
        (["{image}", "hi", "-m", "no-such-org/no-such-model"], 1, "is not in the local Hugging Face cache"),
        (["{image}", "hi", "-m", "{model}", "--device", "cuda:7"], 1, "no CUDA GPU"),
    ],
)
def test_user_errors_are_one_line_and_non_zero(
    args, code, message, llava_path, image_file, corrupt_image, model_without_image_token, tmp_path, asap
):
    names = {
        "model": llava_path,
        "image": image_file,
        "corrupt": corrupt_image,
        "missing": tmp_path / "nope.jpg",
        "no_image_token": model_without_image_token,
    }
    result = asap("run", *[arg.format(**names) for arg in args])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: {lines[0].removeprefix('Error: ')}"] and message in lines[0]
    assert "Traceback" not in result.output


def test_usage_errors_from_the_parser_exit_2(llava_path, image_file, asap):
    result = asap("run", image_file, "hi", "-m", llava_path, "--max-tokens", "0")
    assert result.exit_code == 2
    assert "Error:" in result.stderr


def test_asap_debug_shows_the_traceback(llava_path, tmp_path, monkeypatch, asap):
    monkeypatch.setenv("ASAP_DEBUG", "1")
    result = asap("run", tmp_path / "nope.jpg", "hi", "-m", llava_path)
    assert result.exit_code != 0
    assert "image not found" in str(result.exception)


def test_pool_on_a_tiling_model_is_one_error_line(llava_next_path, image_file, asap):
    result = asap("run", image_file, "hi", "-m", llava_next_path, "--method", "pool", "-k", 4)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "pool needs the image span to be one square grid" in result.stderr


@pytest.mark.parametrize("method", ["divprune", "pool"])
def test_methods_before_the_llm_report_layer_0(method, llava_path, image_file, asap):
    result = asap("run", image_file, "hi", "-m", llava_path, "--method", method, "-k", 16, "--json", "--max-tokens", 2)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layer"] == 0 and data["kept_tokens"] == 16


def test_several_images_run_as_one_batch_equal_to_single_runs(llava_next_path, tmp_path, images, asap):
    """LLaVA-NeXT tiles the two images differently: the batch is padded and its rows keep k each."""
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    common = ["-m", llava_next_path, "-k", 8, "--max-tokens", 5, "--json"]
    batch = asap("run", *paths, "what colour?", *common)
    assert batch.exit_code == 0, batch.output
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(path) for path in paths]
    for row, path in zip(rows, paths, strict=True):
        single = json.loads(asap("run", path, "what colour?", *common).stdout)
        assert row["answer"] == single["answer"] and row["kept_tokens"] == single["kept_tokens"] == 8
        assert row["visual_tokens"] == single["visual_tokens"]
    globbed = asap("run", tmp_path / "*.png", "what colour?", *common)
    assert [json.loads(line)["answer"] for line in globbed.stdout.splitlines()] == [row["answer"] for row in rows]


def test_several_prompts_on_one_image_and_pairing_errors(llava_path, image_file, asap):
    common = ["-m", llava_path, "-k", 16, "--max-tokens", 3]
    result = asap("run", image_file, "-p", "what colour?", "-p", "where is the blue patch?", *common)
    assert result.exit_code == 0, result.output
    assert result.stdout.count(str(image_file)) == 2 and "[where is the blue patch?]" in result.stdout
    summaries = result.stderr.splitlines()  # each summary names its prompt, as its answer line does
    assert [line.split(": ", 1)[0] for line in summaries] == [
        f"{image_file} [what colour?]",
        f"{image_file} [where is the blue patch?]",
    ]
    mismatch = asap("run", image_file, image_file, "-p", "a?", "-p", "b?", "-p", "c?", *common)
    assert mismatch.exit_code == 2 and "2 images and 3 prompts" in mismatch.output
    nothing = asap("run", str(image_file.parent / "*.jpeg"), "what?", *common)
    assert nothing.exit_code == 1 and "no image matches" in nothing.output
    kept = asap("run", image_file, image_file, "what?", "--save-kept", image_file.parent / "k.png", *common)
    assert kept.exit_code == 2 and "--save-kept draws one image" in kept.output


def test_positions_renumber_is_for_methods_that_prune_before_the_llm(llava_path, image_file, asap):
    result = asap("run", image_file, "what?", "-m", llava_path, "--method", "fastv", "--positions", "renumber")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: --positions renumber is for methods that shorten the sequence they feed on (pdrop, sparsevlm, divprune, pool, prumerge-plus, visionzip, vispruner); "
        "fastv keeps original positions"
    )
    args = ["run", image_file, "what?", "-m", llava_path, "--method", "divprune", "-k", 8, "--json"]
    result = asap(*args, "--positions", "renumber", "--max-tokens", 3)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept_tokens"] == 8
    result = asap("eval", "--n", 4, "--methods", "fastv,divprune", "-k", 64, "--positions", "renumber", "--json")
    assert result.exit_code == 0, result.output  # renumbers divprune, leaves fastv as it is
    result = asap("eval", "--n", 4, "--methods", "fastv,asap", "--positions", "renumber")
    assert result.exit_code == 2 and "for methods that shorten the sequence they feed on" in result.stderr


def test_a_prompt_longer_than_the_context_is_refused(llava_path, image_file, asap):
    result = asap("run", image_file, "x" * 4100, "-m", llava_path, "--max-tokens", 2)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the prompt is ")
    assert "the model's context of 4096 leaves no room for an answer" in result.stderr


def test_generation_stops_at_the_end_of_the_context(llava_path, image_file, asap):
    short = json.loads(asap("run", image_file, "x", "-m", llava_path, "--max-tokens", 1, "--json").stdout)
    prompt = "x" * (4096 - 2 - (short["prompt_tokens"] - 1))  # two positions left for the answer
    record = json.loads(asap("run", image_file, prompt, "-m", llava_path, "--max-tokens", 8, "--json").stdout)
    assert record["prompt_tokens"] == 4094 and record["generated_tokens"] == 2
    assert (short["ended"], record["ended"]) == ("max-tokens", "context")  # each cut said, and by what
    summary = asap("run", image_file, prompt, "-m", llava_path, "--max-tokens", 8).stderr
    assert summary.strip().endswith("; answer cut: the model's context is full")


def test_run_says_how_the_answer_ended_and_which_options_the_method_ran_with(asap):
    record = json.loads(asap("run", CAR, "what colour is the car?", "--json").stdout)
    assert (record["answer"], record["ended"]) == ("red", "end")
    assert record["options"] == {
        "lambda_max": 1.0,
        "merge_threshold": 0.9,
        "score_queries": "last",
        "score": "attention",
        "kv_cache": "exact",
    }
    args = ["run", CAR, "what colour is the car?", "--method", "divprune", "--positions", "renumber"]
    record = json.loads(asap(*args, "--max-tokens", 1, "--json").stdout)
    assert record["options"] == {"positions": "renumber"}
    assert record["ended"] in ("end", "max-tokens") and record["generated_tokens"] == 1
    vanilla = json.loads(asap("run", CAR, "what colour is the car?", "--method", "vanilla", "--json").stdout)
    assert vanilla["options"] == {}
    drawn = json.loads(asap("run", CAR, "what colour is the car?", "--method", "random", "--seed", 3, "--json").stdout)
    assert drawn["options"] == {"seed": 3, "kv_cache": "exact"}  # which tokens were drawn, reproducible from the record
    pooled = asap("run", CAR, "what colour is the car?", "--method", "pool", "--layer", 0, "--json")
    assert pooled.exit_code == 0 and json.loads(pooled.stdout)["layer"] == 0  # what pool does anyway


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "{image}", "hi", "--seed", "100000000000000000000000"], "--seed"),
        (["run", "{image}", "hi", "--seed", "-1"], "--seed"),
        (["run", "{image}", "hi", "--temperature", "inf"], "inf is not a finite number"),
        (["run", "{image}", "hi", "--temperature", "nan"], "--temperature"),
        (["run", "{image}", "hi", "-m", ""], "-m/--model is empty"),
        (["flops", "-m", " "], "-m/--model is empty"),
        (["profile", "--k", "12\N{SUPERSCRIPT TWO}"], "k needs a whole number of at least 1, got '12"),
        (["eval", "-k", "\N{SUPERSCRIPT TWO}"], "k needs a whole number"),
        (["profile", "--threads", "100000000000000000000000"], "--threads"),
        (["eval", "--threads", "100000000000000000000000"], "--threads"),
        (["profile", "--batch", "100000000000000000000000"], "--batch"),
    ],
)
def test_values_the_tool_cannot_use_are_usage_errors(args, message, image_file, asap):
    result = asap(*[arg.format(image=image_file) for arg in args])
    assert result.exit_code == 2, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]  # after the parser's usage
    assert len(error) == 1 and message in error[0] and "Traceback" not in result.output


def test_an_unreachable_hub_is_one_error_line_at_once(image_file, monkeypatch, asap):
    """No retries for minutes: the hub is probed once (a name that does not resolve here)."""
    import huggingface_hub

    from asapcli.runtime import loading

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(loading, "read_checkpoint", lambda *args, **kwargs: pytest.fail("tried to download"))
    result = asap("run", image_file, "hi", "-m", "nobody/no-such-model")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        (
            "Error: cannot reach https://hub.invalid to download 'nobody/no-such-model' (no network?); name a local "
            "model folder instead (-m FOLDER; pretrained=FOLDER under lmms-eval; a model already in the Hugging Face "
            "cache loads without the network, and HF_HUB_OFFLINE=1 says so up front)"
        )
    ]


def test_hf_hub_offline_with_an_uncached_model_says_what_to_do(image_file, asap):
    result = asap("run", image_file, "hi", "-m", "nobody/no-such-model")  # conftest sets HF_HUB_OFFLINE=1
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: model 'nobody/no-such-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    )
    assert "pretrained=FOLDER under lmms-eval" in result.stderr  # the plugin's users name it there


def test_ctrl_c_while_the_libraries_import_is_one_line_and_130(monkeypatch, capsys):
    """The console script's first seconds go to importing torch and transformers."""
    import builtins

    import asapcli

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "cli":  # `from .cli import app`
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as exit_status:
        asapcli.main()
    assert exit_status.value.code == 130
    assert capsys.readouterr().err == "Error: interrupted\n"


def test_ctrl_c_while_the_model_loads_is_one_line_and_130(image_file, monkeypatch, asap):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("asapcli.runtime.loading.load", interrupted)
    result = asap("run", image_file, "what colour?")
    assert result.exit_code == 130 and result.stderr == "Error: interrupted\n"


def test_a_forgotten_prompt_or_an_empty_image_path_is_a_usage_error(image_file, asap):
    result = asap("run", image_file, image_file)
    assert result.exit_code == 2 and "is a file: give the question after the images" in result.stderr
    result = asap("run", "", "what?")
    assert result.exit_code == 2 and result.stderr == "Error: an image path is empty\n"


def test_a_prompt_that_fills_the_context_is_refused_in_words_that_add_up(llava_path, image_file, asap):
    """The tiny model holds 4096 positions: a prompt of exactly that many leaves no room."""
    probe = asap("run", image_file, "x", "-m", llava_path, "--json", "--max-tokens", 1)
    fill = 4096 - json.loads(probe.stdout)["prompt_tokens"] + 1  # one character is one token here
    result = asap("run", image_file, "x" * fill, "-m", llava_path, "--max-tokens", 2)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the prompt is 4096 tokens (image tokens included): the model's context")


def test_version_and_shell_completion(monkeypatch, asap):
    import shellingham

    from asapcli import __version__

    assert asap("--version").stdout == f"asap {__version__}\n"
    # --show-completion writes the script of the shell it finds asap started from; pytest's own
    # parent (sh -c, a CI runner, an IDE) is not the user's: say the user runs bash.
    monkeypatch.setattr(shellingham, "detect_shell", lambda *args, **kwargs: ("bash", "/bin/bash"))
    monkeypatch.delenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", raising=False)  # typer's switch for this
    completion = asap("--show-completion")
    assert completion.exit_code == 0, completion.output
    assert "_ASAP_COMPLETE=complete_bash" in completion.stdout


def test_threads_on_run_and_urls_said_to_be_unsupported(image_file, llava_path, asap):
    before = torch.get_num_threads()
    try:
        result = asap("run", image_file, "hi", "-m", llava_path, "--threads", 1, "--max-tokens", 1)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    result = asap("run", "https://example.com/cars.jpg", "how many cars?")
    assert result.exit_code == 2
    assert "image URLs are not supported (https://example.com/cars.jpg): download the image" in result.stderr


def test_vanilla_reports_no_budget_or_layer_it_did_not_use(image_file, llava_path, asap):
    result = asap("run", image_file, "hi", "-m", llava_path, "--method", "vanilla", "--json", "--max-tokens", 1)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["k"], record["layer"]) == (None, None)
    assert record["visual_tokens"] == record["kept_tokens"] == 64


def test_a_download_shows_the_hubs_progress_and_loading_shows_none(image_file, llava_path, asap):
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    assert asap("run", image_file, "hi", "-m", llava_path, "--max-tokens", 1).exit_code == 0
    assert not huggingface_hub.utils.are_progress_bars_disabled()  # bytes and time left of a download
    assert not transformers_logging.is_progress_bar_enabled()  # no "Loading weights" bar


def test_help_lists_choices_and_the_methods_own_defaults(asap):
    text = " ".join(asap("run", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert (
        "--method {vanilla|asap|asap-bimask-only|fastv|pdrop|random|sparsevlm|divprune|pool|prumerge-plus|visionzip|"
        "vispruner}" in text
    )
    assert "--score-queries {last|text|all}" in text and "Default: last." in text
    assert "SG-BiMask's largest forward visibility, in (0, 1]. Default: 1.0." in text
    assert "--dtype {auto|bfloat16|float16|float32}" in text and "<str>" not in text


@pytest.mark.parametrize("command", ["run", "chat", "compare", "flops", "profile", "eval"])
def test_help_names_values_not_python_types(command, asap):
    """No `<list[str]>`, `<path>` or `<int range>`: each argument and option by its metavar."""
    text = asap(command, "--help", env={"COLUMNS": "200"}).stdout
    assert not re.findall(r"<[a-z][^>]*>", text), text
    assert "[[" not in text.splitlines()[0]  # the usage line brackets an optional argument once


def test_a_figure_named_only_by_its_suffix_is_refused_before_the_load(asap):
    result = asap("run", CAR, "what colour is the car?", "--save-kept", ".png")
    assert result.exit_code == 2
    assert result.stderr == "Error: .png names a format but no file: give it a name, e.g. kept.png\n"


def test_a_piped_chat_says_when_an_answer_was_cut(asap):
    """Off a terminal chat prints no summary line: an answer cut short said nothing (--json did)."""
    result = asap("chat", CAR, "--max-tokens", 1, input="what colour is the car?\n")
    assert result.exit_code == 0, result.output
    assert "(answer cut at --max-tokens (1 token))" in result.stderr


def test_help_lists_only_what_the_command_takes(asap):
    """eval listed --layers and --random-weights (which it refuses); chat takes every method (a
    SequenceCache continues the caches of those that prune before the language model too)."""
    from asapcli.engine.methods import METHODS

    chat = asap("chat", "--help").stdout
    assert all(name in chat for name in METHODS) and "--important-ratio" in chat
    evaluated = asap("eval", "--help").stdout
    assert "--layers" not in evaluated and "--random-weights" not in evaluated
    assert "--important-ratio" in asap("run", "--help").stdout
    assert "--random-weights" in asap("profile", "--help").stdout


def test_install_completion_that_cannot_write_is_one_error_line(tmp_path):
    """A read-only or full home, or one that is not a folder: typer's OSError, once a traceback."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.write_text("not a folder")
    environment = {**os.environ, "HOME": str(home), "SHELL": "/bin/bash"}
    done = subprocess.run(
        [sys.executable, "-m", "asapcli", "--install-completion"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("Error: cannot write ") and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("method", "kept", "why"),
    [("asap", 128, None), ("pool", 121, "largest square grid"), ("pdrop", 1, "the mean its stages keep")],
)
def test_a_k_the_method_does_not_meet_is_said_with_why(method, kept, why, asap):
    """pdrop printed "kept 1/576 visual tokens" at k = 128 with no word of why (issue 35)."""
    common = [CAR, "what colour is the car?", "--method", method, "--max-tokens", 1, "--threads", 1]
    answer = json.loads(asap("run", *common, "--json").stdout)
    assert answer["kept_tokens"] == kept
    assert (answer["k_unmet"] is None) if why is None else why in answer["k_unmet"]
    summary = asap("run", *common).stderr
    assert ("k=128 unmet" in summary) == (why is not None)
    if why is not None:
        table = asap("eval", "--n", 2, "--methods", method, "-k", 128, "--threads", 1).stdout
        assert f"k: {answer['k_unmet']}." in table


WHERE = "--model --device --dtype --device-map --threads"
COUNTED_OPTIONS = (
    "--lambda-max --merge-threshold --score-queries --score --important-ratio --positions --contextual --adaptive "
    "--stage-ratio --stage-counts"
)  # what asap flops counts by: its own --kv-cache counts every method's cache
METHOD_OPTIONS = f"{COUNTED_OPTIONS} --kv-cache"
COMMAND_OPTIONS = {
    "chat": f"image {WHERE} --random-weights --layers --method --k --flops --layer {METHOD_OPTIONS} --max-tokens "
    "--temperature --top-p --top-k --seed --system --json",
    "compare": f"image prompt {WHERE} --random-weights --layers --methods --k --flops --layer --seed {METHOD_OPTIONS} "
    "--max-tokens --out --json",
    "env": "--json",
    "eval": f"{WHERE} --data --n --methods --k --flops --layer --seed {METHOD_OPTIONS} --max-tokens --batch --plot "
    "--attention-profile --log-samples --prompt-suffix --json --format",
    "flops": f"{WHERE} --random-weights --layers --k --flops --layer --schedule --visual-tokens --gqa --measure --kv-cache "
    "--text-tokens --method "
    f"{COUNTED_OPTIONS} --json --format",
    "models": "--json",
    "profile": f"{WHERE} --random-weights --layers --image --prompt --methods --k --flops --layer --seed {METHOD_OPTIONS} "
    "--repeats --warmup --decode-tokens --batch --json --format",
    "run": f"arguments --image --prompt {WHERE} --random-weights --layers --method --k --flops --layer {METHOD_OPTIONS} "
    "--max-tokens --temperature --top-p --top-k --seed --system --save-kept --json",
}


@pytest.mark.parametrize("name", sorted(COMMAND_OPTIONS))
def test_each_commands_options_are_pinned(name):
    """The options each command's --help lists, in order: the option groups and the method options
    are spread into the commands by options.py, so a change there shows here, command by command
    (chat lists the options of the methods it takes only)."""
    import typer.main

    from asapcli.cli import app

    command = typer.main.get_command(app).commands[name]
    shown = [p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0] for p in command.params if not p.hidden]
    assert " ".join(shown) == COMMAND_OPTIONS[name]
