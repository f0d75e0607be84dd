"""Progress off a terminal (a pipe, a CI log): every long command prints a plain line at most
every 10 s and at the end (done/total, time, rate and time left), never minutes of silence; the
rate and time left are those of the steps so far."""

import pytest

from asapcli.report import display


@pytest.fixture
def every_step(monkeypatch):
    """A progress line for every step instead of one per 10 s."""
    monkeypatch.setattr(display, "PLAIN_PROGRESS_SECONDS", 0.0)


def progress_lines(stderr: str, what: str) -> list[str]:
    return [line.split(" (")[0] for line in stderr.splitlines() if line.startswith(what)]


def test_profile_counts_its_prefills_and_decodes(every_step, llava_path, asap):
    fast = ["--repeats", 2, "--warmup", 1, "--decode-tokens", 1, "--methods", "vanilla,asap", "-k", 16, "--json"]
    result = asap("profile", "-m", llava_path, *fast)
    assert result.exit_code == 0, result.output
    # 2 runs x (1 warm-up + 2 timed prefills), then each run's memory and decoding
    assert progress_lines(result.stderr, "Prefills") == [f"Prefills and decodes: {n}/8" for n in range(1, 9)]


def test_compare_counts_its_answers(every_step, llava_path, image_file, asap):
    result = asap("compare", image_file, "what?", "-m", llava_path, "--methods", "fastv", "-k", 16, "--max-tokens", 1)
    assert result.exit_code == 0, result.output
    assert progress_lines(result.stderr, "Answers") == ["Answers: 1/2", "Answers: 2/2"]  # vanilla, then fastv


def test_a_batch_counts_its_decoding_steps(every_step, llava_path, image_file, images, tmp_path, asap):
    second = tmp_path / "second.png"
    images[1].save(second)
    result = asap("run", image_file, second, "what?", "-m", llava_path, "--max-tokens", 3, "--json")
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "Decoding")
    assert lines[0] == "Decoding 2 samples in one batch: 1/3" and len(lines) <= 3


def test_the_line_says_the_rate_and_the_time_left():
    assert display._pace(10, 40, 5.0) == "5 s, 2.0/s, about 15 s left"
    assert display._pace(3, 10, 12.0) == "12 s, 4.0 s each, about 28 s left"
    assert display._pace(5, 1000, 10.0) == "10 s, 2.0 s each, about 33 min left"
    assert display._pace(40, 40, 20.0) == "20 s"  # done: the time it took
