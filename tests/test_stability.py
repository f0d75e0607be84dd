"""Timings a user can trust (issue 33): every timed figure of `asap profile` with its spread, a
verdict that names what made a run unstable (spread, load, a time ratio no prefill can reach),
and a thread count that does not oversubscribe the CPUs. The machine's state is stubbed, so that
each verdict is tested on a run made unstable on purpose, whatever the test machine is doing."""

import json

import pytest
import torch

from asapcli.measure import profiling, stability
from asapcli.measure.stability import Interval, Spread, judge, median_interval
from asapcli.runtime import machine

FAST = ["--repeats", "6", "--warmup", "0", "--decode-tokens", "4"]


# --- the statistics ---------------------------------------------------------------------------


def test_spread_is_the_median_and_the_inclusive_quartiles():
    spread = Spread.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (spread.median, spread.q1, spread.q3, spread.low, spread.high) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert spread.iqr == 2.0 and spread.relative_iqr == pytest.approx(2 / 3) and spread.wide
    assert not Spread.of([1.0, 1.02, 0.99, 1.01]).wide
    assert Spread.of([2.0]).iqr == 0.0  # one sample: no spread to speak of, and no crash


@pytest.mark.parametrize(
    ("n", "ranks", "confidence"),
    [
        (5, (1, 5), 1 - 2 / 32),  # under 6 samples 95% cannot be had: min..max, at what it has
        (6, (1, 6), 1 - 2 / 64),
        (10, (2, 9), 1 - 2 * 11 / 1024),
        (20, (6, 15), 1 - 2 * sum(__import__("math").comb(20, i) for i in range(6)) / 2**20),
    ],
)
def test_the_median_interval_is_the_binomial_order_statistics_one(n, ranks, confidence):
    samples = [float(value) for value in range(n, 0, -1)]  # given in any order
    found = median_interval(samples)
    assert (found.low, found.high) == ranks and found.confidence == pytest.approx(confidence)
    assert found.confidence >= 0.95 or n < 6


def test_the_median_interval_equals_scipys_quantile_test():
    stats = pytest.importorskip("scipy.stats")
    samples = [0.93, 1.12, 1.01, 0.97, 1.30, 0.88, 1.05, 0.99, 1.41, 1.02, 0.95, 1.07, 1.0]
    expected = stats.quantile_test(samples, p=0.5).confidence_interval(0.95)
    found = median_interval(samples)
    assert (found.low, found.high) == (expected.low, expected.high)


def test_paired_ratios_keep_what_a_drifting_machine_changes_alike():
    vanilla = [1.0, 2.0, 1.0, 4.0]  # the machine slows down and back, for both
    method = [0.5, 1.0, 0.5, 2.0]
    assert stability.paired_ratios(method, vanilla) == [0.5] * 4
    assert median_interval(stability.paired_ratios(method, vanilla)).high == 0.5


# --- the verdict ------------------------------------------------------------------------------


STEADY = Spread.of([1.0, 1.01, 0.99, 1.0, 1.02, 0.98])


def test_a_steady_run_on_a_quiet_machine_is_stable():
    ratio = Interval(0.5, 0.48, 0.52, 0.97)
    verdict = judge(STEADY, STEADY, ratio, prompt_flops_ratio=0.44, load=1.5, cpus=2)
    assert verdict.stable and verdict.reasons == {}


def test_wide_spread_is_named():
    wide = Spread.of([1.0, 1.4, 0.7, 1.0, 1.3, 0.8])
    verdict = judge(wide, STEADY, None, prompt_flops_ratio=0.44, load=0.1, cpus=2)
    assert list(verdict.reasons) == ["prefill_spread"] and "spread" in verdict.reasons["prefill_spread"]
    assert verdict.marks("prefill") and not verdict.marks("ratio") and not verdict.marks("decode")
    assert list(judge(STEADY, wide, None, 0.44, 0.1, 2).reasons) == ["decode_spread"]


def test_a_time_ratio_under_the_prompts_flops_ratio_is_physically_impossible():
    # issue 33's run: fastv 42.5% and asap 39.3% of vanilla for a whole-prompt FLOPs ratio of 43.9%
    impossible = Interval(0.393, 0.37, 0.41, 0.97)
    verdict = judge(STEADY, STEADY, impossible, prompt_flops_ratio=0.439, load=0.1, cpus=2)
    assert list(verdict.reasons) == ["under_flops"] and "43.9%" in verdict.reasons["under_flops"]
    assert verdict.marks("ratio")
    # inside its interval the FLOPs ratio is reachable: no verdict from one low median
    assert judge(STEADY, STEADY, Interval(0.43, 0.41, 0.45, 0.97), 0.439, 0.1, 2).stable


def test_a_load_over_the_cpus_marks_every_time():
    verdict = judge(STEADY, STEADY, None, prompt_flops_ratio=0.44, load=6.5, cpus=2)
    assert list(verdict.reasons) == ["load"] and "6.5" in verdict.reasons["load"]
    assert all(verdict.marks(cell) for cell in ("prefill", "decode", "ratio"))
    assert stability.oversubscribed(2.01, 2) and not stability.oversubscribed(2.0, 2)
    assert not stability.oversubscribed(None, 2)  # no load average kept (not Linux): no verdict


def test_overlapping_intervals_are_grouped_as_not_told_apart():
    intervals = {
        "asap": Interval(0.393, 0.37, 0.44, 0.97),
        "fastv": Interval(0.425, 0.40, 0.45, 0.97),
        "divprune": Interval(0.25, 0.24, 0.26, 0.97),
    }
    assert stability.indistinct(intervals) == [["asap", "fastv"]]
    intervals["fastv"] = Interval(0.48, 0.46, 0.50, 0.97)
    assert stability.indistinct(intervals) == []


# --- asap profile: spread, verdict, marks -----------------------------------------------------


@pytest.fixture
def quiet(monkeypatch):
    """A machine whose load average is low, whatever this one's is."""
    monkeypatch.setattr(machine, "load_average", lambda: 0.2)


def test_profile_json_carries_each_figures_spread_and_verdict(llava_path, asap, quiet):
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--json", *FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row in rows:
        assert len(row["prefill_seconds_all"]) == 6 and len(row["decode_step_seconds_all"]) == 4
        assert row["prefill_seconds"] == Spread.of(row["prefill_seconds_all"]).median
        assert row["prefill_seconds_iqr"] == pytest.approx(Spread.of(row["prefill_seconds_all"]).iqr)
        assert row["decode_tokens_per_second"] == pytest.approx(1 / Spread.of(row["decode_step_seconds_all"]).median)
        low, high = row["time_ratio_interval"]
        assert low <= row["time_ratio"] <= high and row["time_ratio_confidence"] == pytest.approx(1 - 2 / 64)
        assert row["stable"] == (row["unstable"] == {})
        assert set(row["unstable"]) <= set(stability.CAUSES)
        assert row["cpus_available"] >= 1 and row["load_average_start"] == 0.2 == row["load_average_end"]
        environment = row["environment"]
        assert environment["threads"] == 1 and environment["cpus_available"] == row["cpus_available"]
        assert environment["cpu_model"] is None or isinstance(environment["cpu_model"], str)
    vanilla, fastv = rows[0], rows[1]
    assert vanilla["time_ratio"] == 1.0 and vanilla["time_ratio_interval"] == [1.0, 1.0]
    ratios = stability.paired_ratios(fastv["prefill_seconds_all"], vanilla["prefill_seconds_all"])
    assert fastv["time_ratio"] == median_interval(ratios).median  # paired round by round, not medians divided


def test_profile_table_shows_the_spread_columns(llava_path, asap, quiet):
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, *FAST)
    assert result.exit_code == 0, result.output
    for header in ("IQR", "interval"):
        assert header in result.stdout
    assert "median of 6 rounds" in result.stdout and "97% at 6 rounds" in result.stdout
    assert "Load average 0.2 -> 0.2 on" in result.stdout


def _scripted(monkeypatch, prefill: dict[str, list[float]], decode: list[float] | None = None):
    """`measure` as it is, its times then replaced by the given ones, per method: a run made
    unstable (or impossible) on purpose."""
    measured = profiling.measure

    def measure(*args, **kwargs):
        results = measured(*args, **kwargs)
        for result in results:
            result.prefill_seconds = list(prefill[result.method])
            if decode is not None:
                result.decode_step_seconds = list(decode)
        return results

    monkeypatch.setattr(profiling, "measure", measure)


STEADY_DECODE = [0.010, 0.0101, 0.0099, 0.010]


def test_an_unstable_run_warns_marks_its_cells_and_says_stable_false(llava_path, asap, quiet, monkeypatch):
    vanilla = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    _scripted(
        monkeypatch,
        {"vanilla": vanilla, "fastv": [0.8, 1.2, 0.7, 0.9, 1.25, 0.75], "asap": [0.9, 0.91, 0.89, 0.9, 0.92, 0.88]},
        STEADY_DECODE,
    )
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, *FAST)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and "fastv k=16: prefill times spread" in warning[0]
    assert "--threads 1" in warning[0] and "--repeats" in warning[0]
    cells = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("fastv", "asap"))}
    assert any(cell.endswith("!") for cell in cells["fastv"]) and not any(c.endswith("!") for c in cells["asap"])

    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--json", *FAST)
    rows = {row["method"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert not rows["fastv"]["stable"] and list(rows["fastv"]["unstable"]) == ["prefill_spread"]
    assert rows["asap"]["stable"] and rows["vanilla"]["stable"]


def test_a_ratio_no_prefill_can_reach_is_refused_as_a_result(llava_path, asap, quiet, monkeypatch):
    vanilla = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    _scripted(monkeypatch, {"vanilla": vanilla, "fastv": [0.1 * t for t in vanilla], "asap": vanilla}, STEADY_DECODE)
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--json", *FAST)
    rows = {row["method"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert list(rows["fastv"]["unstable"]) == ["under_flops"] and rows["asap"]["stable"]
    assert "which no prefill can beat" in result.stderr


def test_a_busy_machine_marks_every_timing(llava_path, asap, monkeypatch):
    """Busy when the measuring starts, quiet by its end: the 1-minute average lags, either counts."""
    load = {"now": 6.5}
    monkeypatch.setattr(machine, "load_average", lambda: load["now"])
    monkeypatch.setattr(machine, "available_cpus", lambda: 2)
    measured = profiling.measure

    def measure(*args, **kwargs):
        results = measured(*args, **kwargs)
        load["now"] = 0.2
        return results

    monkeypatch.setattr(profiling, "measure", measure)
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, *FAST)
    assert result.exit_code == 0, result.output
    assert "load average 6.5 over the 2 CPUs" in result.stderr
    for line in result.stdout.splitlines():
        if line.startswith(("vanilla", "fastv", "asap")):
            assert line.rstrip().endswith("!")  # tok/s, as every timing cell


def test_methods_inside_each_others_intervals_are_said_to_be_not_told_apart(llava_path, asap, quiet, monkeypatch):
    vanilla = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    fastv = [0.90, 0.92, 0.88, 0.91, 0.89, 0.90]
    asap_times = [0.91, 0.89, 0.90, 0.88, 0.92, 0.895]  # a median under fastv's, from noise
    _scripted(monkeypatch, {"vanilla": vanilla, "fastv": fastv, "asap": asap_times}, STEADY_DECODE)
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, *FAST)
    assert "k=16: fastv, asap take the same time within their intervals" in result.stdout.replace(
        "asap, fastv", "fastv, asap"
    )


# --- threads chosen for the machine -----------------------------------------------------------


@pytest.mark.parametrize(("cpus", "busy", "threads"), [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 2.0, 1), (8, 3.0, 5)])
def test_threads_keep_to_the_cpus_other_work_leaves(cpus, busy, threads):
    assert machine.threads_for(cpus, busy) == threads
    assert machine.threads_for(cpus, None) == cpus  # no load known: PyTorch's own choice


def test_busy_elsewhere_reads_the_runnable_tasks_less_the_reader(tmp_path, monkeypatch):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("6.50 5.00 4.00 3/412 12345\n")  # two other runnable tasks beside the reader
    monkeypatch.setattr(machine, "PROC_LOADAVG", loadavg)
    assert machine.busy_elsewhere() == 2.0
    monkeypatch.setattr(machine, "PROC_LOADAVG", tmp_path / "absent")
    assert machine.busy_elsewhere() is None


def test_a_cgroup_quota_caps_the_cpus(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(machine, "CGROUP_CPU_MAX", quota)
    quota.write_text("150000 100000\n")  # docker --cpus 1.5
    assert machine.available_cpus() == min(2, len(__import__("os").sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert machine.available_cpus() == len(__import__("os").sched_getaffinity(0))


def test_omp_num_threads_and_threads_override_the_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.choose_threads() == 3
    assert machine.choose_threads(5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(machine, "available_cpus", lambda: 2)
    monkeypatch.setattr(machine, "busy_elsewhere", lambda: 2.0)
    assert machine.choose_threads() == 1


def test_a_command_on_a_busy_machine_runs_one_thread_and_its_records_say_so(llava_path, image_file, asap, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(machine, "available_cpus", lambda: 2)
    monkeypatch.setattr(machine, "busy_elsewhere", lambda: 2.0)  # two busy processes on two cores
    previous = torch.get_num_threads()
    try:
        result = asap("run", image_file, "what colour?", "-m", llava_path, "-k", 16, "--max-tokens", 2, "--json")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        assert json.loads(result.stdout)["environment"]["threads"] == 1
        monkeypatch.setattr(machine, "busy_elsewhere", lambda: 0.0)  # idle: both cores, no note
        result = asap("run", image_file, "what colour?", "-m", llava_path, "-k", 16, "--max-tokens", 2)
        assert torch.get_num_threads() == 2 and "(one sample, CPU, 2 threads" in result.stderr
    finally:
        torch.set_num_threads(previous)


def test_threads_help_says_how_the_default_is_chosen(asap):
    result = asap("run", "--help")
    text = " ".join(result.stdout.split())
    assert "less those other work keeps busy now" in text and "OMP_NUM_THREADS" in text
