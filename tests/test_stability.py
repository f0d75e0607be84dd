"""Timings a user can trust (issue 33): every timed figure of `asap profile` with its spread, a
verdict that names what made a run unstable (spread, load, a time ratio no prefill can reach),
and a thread count that does not oversubscribe the CPUs. The machine's state is stubbed, so that
each verdict is tested on a run made unstable on purpose, whatever the test machine is doing."""

import csv
import json

import pytest
import torch

from asapcli.measure import profiling, stability
from asapcli.measure.stability import Interval, Spread, judge, median_interval
from asapcli.runtime import machine

FAST = ["--repeats", "6", "--warmup", "0", "--decode-tokens", "6"]


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
QUIET = stability.Conditions(rounds=10, steps=16, threads=2, cpus=2, busy=0.0)


def test_a_steady_run_on_a_quiet_machine_is_stable():
    ratio = Interval(0.5, 0.48, 0.52, 0.97)
    verdict = judge(STEADY, STEADY, ratio, 0.44, QUIET)
    assert verdict.stable and verdict.reasons == {}


def test_wide_spread_is_named():
    wide = Spread.of([1.0, 1.4, 0.7, 1.0, 1.3, 0.8])
    verdict = judge(wide, STEADY, None, 0.44, QUIET)
    assert list(verdict.reasons) == ["prefill_spread"] and "spread 37.5%" in verdict.reasons["prefill_spread"]
    assert verdict.marks("prefill") and not verdict.marks("ratio") and not verdict.marks("decode")
    assert list(judge(STEADY, wide, None, 0.44, QUIET).reasons) == ["decode_spread"]


def test_too_few_rounds_or_steps_are_no_verdict_of_stability():
    """One round has no spread and no interval: it cannot be called stable."""
    one = Spread.of([1.0])
    few = stability.Conditions(rounds=1, steps=2, threads=1, cpus=2, busy=0.0)
    verdict = judge(one, Spread.of([0.01, 0.01]), Interval(0.5, 0.5, 0.5, 0.0), 0.44, few)
    assert list(verdict.reasons) == ["few_rounds", "few_steps"]
    assert all(verdict.marks(cell) for cell in ("prefill", "decode", "ratio"))
    assert stability.advice(list(verdict.reasons), 1) == "--repeats 10, --decode-tokens 16"


def test_a_time_ratio_under_the_prompts_flops_ratio_is_physically_impossible():
    # issue 33's run: fastv 42.5% and asap 39.3% of vanilla for a whole-prompt FLOPs ratio of 43.9%
    impossible = Interval(0.393, 0.37, 0.41, 0.97)
    verdict = judge(STEADY, STEADY, impossible, 0.439, QUIET)
    assert list(verdict.reasons) == ["under_flops"] and "43.9%" in verdict.reasons["under_flops"]
    assert verdict.marks("ratio")
    # inside its interval the FLOPs ratio is reachable: no verdict from one low median
    assert judge(STEADY, STEADY, Interval(0.43, 0.41, 0.45, 0.97), 0.439, QUIET).stable


@pytest.mark.parametrize(
    ("threads", "busy", "cpus", "loaded"),
    [
        (2, 0.0, 2, False),
        (2, 0.2, 2, False),
        (2, 0.5, 2, True),
        (1, 1.0, 2, False),
        (1, 1.5, 2, True),
        (4, 0.0, 2, True),
    ],
)
def test_threads_and_other_work_over_the_cpus_mark_every_time(threads, busy, cpus, loaded):
    """Judged on the work runnable while the rounds ran (this run's threads, others' tasks), not on
    the 1-minute load average, which lags a minute behind."""
    under = stability.Conditions(rounds=10, steps=16, threads=threads, cpus=cpus, busy=busy)
    verdict = judge(STEADY, STEADY, None, 0.44, under)
    assert ("load" in verdict.reasons) == loaded
    if loaded:
        assert all(verdict.marks(cell) for cell in ("prefill", "decode", "ratio"))
        assert (
            f"{threads} thread" in verdict.reasons["load"]
            and f"{busy:.1f} CPUs of other work" in verdict.reasons["load"]
        )
    assert stability.oversubscribed(2.26, 2) and not stability.oversubscribed(2.25, 2)
    assert not stability.oversubscribed(None, 2)  # nothing known (not Linux): no verdict


def test_the_default_threads_never_trip_the_verdict_by_themselves():
    for cpus in (1, 2, 4, 8):
        for tenth in range(10 * cpus + 1):
            busy = tenth / 10
            threads = machine.threads_for(cpus, busy)
            assert threads == 1 or not stability.oversubscribed(threads + busy, cpus), (cpus, busy, threads)


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
    """A machine with nothing else running, whatever this one runs."""
    monkeypatch.setattr(machine, "load_average", lambda: 0.2)
    monkeypatch.setattr(machine, "runnable_elsewhere", lambda: 0)


def test_profile_json_carries_each_figures_spread_and_verdict(llava_path, asap, quiet):
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--json", *FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row in rows:
        assert len(row["prefill_seconds_all"]) == 6 and len(row["decode_step_seconds_all"]) == 6
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
    text = " ".join(result.stdout.split())
    assert "median of 6 rounds" in text and "96.9% confidence at 6 rounds" in text
    assert "load average 0.2 -> 0.2; other work kept 0.0 of them busy during the rounds" in text


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


STEADY_DECODE = [0.010, 0.0101, 0.0099, 0.010, 0.0101, 0.0099]


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
    assert warning[0].endswith("Try a quieter machine.")  # --threads 1 already; more rounds do not narrow a spread
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
    """Other processes runnable while the rounds ran: every timing cell marked, said once."""
    monkeypatch.setattr(machine, "runnable_elsewhere", lambda: 2)
    monkeypatch.setattr(machine, "available_cpus", lambda: 2)
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, *FAST)
    assert result.exit_code == 0, result.output
    assert "1 thread and 2.0 CPUs of other work on the 2 CPUs" in result.stderr
    for line in result.stdout.splitlines():
        if line.startswith(("vanilla", "fastv", "asap")):
            assert line.rstrip().endswith("!")  # tok/s, as every timing cell
    rows = [
        json.loads(line)
        for line in asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--json", *FAST).stdout.splitlines()
    ]
    assert all(row["busy_cpus"] == 2.0 and "load" in row["unstable"] for row in rows)


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


@pytest.mark.parametrize(
    ("cpus", "busy", "threads"),
    [(2, 0.0, 2), (2, 0.2, 2), (2, 0.4, 1), (2, 1.0, 1), (2, 2.0, 1), (8, 3.0, 5), (4, 1.5, 2)],
)
def test_threads_keep_to_the_cpus_other_work_leaves(cpus, busy, threads):
    assert machine.threads_for(cpus, busy) == threads
    assert machine.threads_for(cpus, None) == cpus  # no load known: PyTorch's own choice


def test_runnable_elsewhere_is_the_systems_runnable_tasks_less_this_process(tmp_path, monkeypatch):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("6.50 5.00 4.00 3/412 12345\n")  # three runnable tasks, the reading thread among them
    monkeypatch.setattr(machine, "PROC_LOADAVG", loadavg)
    assert machine.runnable_elsewhere() == 2 and machine.busy_elsewhere(samples=3) == 2.0
    monkeypatch.setattr(machine, "_own_runnable", lambda: 3)  # three threads of this process at work
    assert machine.runnable_elsewhere() == 0
    monkeypatch.setattr(machine, "PROC_LOADAVG", tmp_path / "absent")
    assert machine.runnable_elsewhere() is None and machine.busy_elsewhere() is None


def test_this_process_counts_its_own_runnable_threads():
    assert machine._own_runnable() >= 1  # the thread reading, at least


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


def test_a_method_whose_interval_holds_100_percent_is_not_told_apart_from_vanilla(llava_path, asap, quiet, monkeypatch):
    vanilla = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    _scripted(
        monkeypatch, {"vanilla": vanilla, "fastv": [0.97, 1.03, 0.99, 1.01, 0.98, 1.02], "asap": vanilla}, STEADY_DECODE
    )
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, *FAST)
    assert "k=16: fastv, asap not told apart from vanilla (the interval holds 100%)." in result.stdout


def test_under_six_rounds_no_method_is_told_apart(llava_path, asap, quiet):
    result = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--repeats", 3, "--warmup", 0)
    assert "3 rounds: too few for a 95% interval; this run tells no method apart from another." in result.stdout
    assert "75%" in result.stdout.splitlines()[1]  # the interval's header says the confidence it has
    assert "3 rounds: too few for a spread or a 95% interval" in result.stderr


def test_csv_has_the_same_columns_stable_or_not(llava_path, asap, quiet, monkeypatch):
    header = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--format", "csv", *FAST).stdout.splitlines()[
        0
    ]
    monkeypatch.setattr(machine, "runnable_elsewhere", lambda: 3)
    loaded = asap("profile", "-m", llava_path, "-k", 16, "--threads", 1, "--format", "csv", *FAST).stdout.splitlines()
    assert loaded[0] == header and "unstable" in header.split(",")
    rows = list(csv.DictReader(loaded))
    assert all("load" in row["unstable"].split(";") for row in rows)
