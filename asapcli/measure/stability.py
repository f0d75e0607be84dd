"""Whether a set of timings can be trusted, in the way pyperf, hyperfine and torch.utils.benchmark
judge theirs: each figure with its spread, a verdict that names what made it unstable, and the
one check only a tool that knows the FLOPs can make (a pruned prefill cannot take a smaller
share of vanilla's time than of its FLOPs).

Statistics from the standard library (`statistics`); the median's interval is the classical
distribution-free one (order statistics with binomial coverage), which holds for any
distribution of times and at the few rounds a benchmark affords. Imports no torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# torch.utils.benchmark warns at this IQR / median, pyperf at a std dev of 10% of the mean.
SPREAD_LIMIT = 0.10
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    """The median of some timings, their quartiles and extremes."""

    median: float
    q1: float
    q3: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        if not samples:
            raise ValueError("no samples")
        q1, q3 = (
            (statistics.quantiles(samples, n=4, method="inclusive")[i] for i in (0, 2))
            if len(samples) > 1
            else (samples[0], samples[0])
        )
        return cls(statistics.median(samples), q1, q3, min(samples), max(samples))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def relative_iqr(self) -> float:
        return self.iqr / self.median if self.median > 0 else 0.0

    @property
    def wide(self) -> bool:
        return self.relative_iqr > SPREAD_LIMIT


@dataclass(frozen=True)
class Interval:
    """A median with a distribution-free interval around it, and the confidence it has."""

    median: float
    low: float
    high: float
    confidence: float

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def median_interval(samples: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The median and the narrowest interval between order statistics x(j) and x(n+1-j) that
    holds the true median with at least `confidence` (P = 1 - 2 P[Binomial(n, 1/2) < j]). Under 6
    samples none reaches 95%: the interval is then min..max, with the confidence it has."""
    ordered, n = sorted(samples), len(samples)
    if n == 0:
        raise ValueError("no samples")
    j, below = 1, 1 / 2**n  # below: P[Binomial(n, 1/2) <= j - 1], the chance x(j) lies above the median
    while 2 * (j + 1) <= n + 1:
        after = below + math.comb(n, j) / 2**n
        if 1 - 2 * after < confidence:
            break
        j, below = j + 1, after
    return Interval(statistics.median(ordered), ordered[j - 1], ordered[n - j], 1 - 2 * below)


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Each round's time over the reference's in the same round: a machine that slows down for a
    round slows both, and the ratio keeps what the method changed."""
    return [time / base for time, base in zip(times, reference, strict=True)]


# Other work under a quarter of a CPU beside this run's threads (a shell, a monitor) is no verdict.
SLACK = 0.25
FEWEST = 6  # samples for a median's 95% interval, and for a spread to say something


def oversubscribed(demand: float | None, cpus: int) -> bool:
    """More runnable work than CPUs (past SLACK): threads wait for a core, and times measure the
    queue. `demand`: a load average, or this run's threads plus the CPUs other work kept busy.
    The rule the docs test judges the docs' times by too."""
    return demand is not None and demand > cpus + SLACK


@dataclass(frozen=True)
class Conditions:
    """What one run's timings were taken under: its rounds, decoding steps, threads, the CPUs it
    may use and those other work kept busy meanwhile (None: not known)."""

    rounds: int
    steps: int
    threads: int
    cpus: int
    busy: float | None


# The causes a verdict can name, as the JSON spells them: the cells of a table they mark, and
# what to do about them.
CAUSES = {
    "few_rounds": (("prefill", "ratio"), "--repeats 10"),
    "few_steps": (("decode",), "--decode-tokens 16"),
    "prefill_spread": (("prefill",), "a quieter machine"),
    "decode_spread": (("decode",), "a quieter machine"),
    "under_flops": (("ratio",), "a quieter machine, more --repeats"),
    "load": (("prefill", "decode", "ratio"), "a quieter machine"),
}


RUN_WIDE = ("load", "few_rounds", "few_steps")  # causes that hold for every row of a run alike


@dataclass(frozen=True)
class Verdict:
    """What makes one method's timings untrustworthy: cause (a key of CAUSES) -> why, in words.
    Nothing: stable."""

    reasons: dict[str, str]

    @property
    def stable(self) -> bool:
        return not self.reasons

    def marks(self, cell: str) -> bool:
        """Whether the table marks `cell` (prefill, decode or ratio) as unreliable."""
        return any(cell in CAUSES[cause][0] for cause in self.reasons)


def advice(causes: list[str], threads: int | None) -> str:
    """What to do about `causes`, once each: the causes' own, and fewer threads where there are some to spare."""
    said = [CAUSES[cause][1] for cause in causes]
    if threads is not None and threads > 1 and {"load", "prefill_spread", "decode_spread"} & set(causes):
        said.append(f"fewer --threads than the {threads} used")
    return ", ".join(dict.fromkeys(said))


def judge(
    prefill: Spread, decode: Spread, ratio: Interval | None, prompt_flops_ratio: float, under: Conditions
) -> Verdict:
    """The causes that make one method's timings unreliable, each in words."""
    reasons = {}
    if under.rounds < FEWEST:
        reasons["few_rounds"] = (
            f"{under.rounds} round{'s' if under.rounds > 1 else ''}: too few for a spread or a 95% interval ({FEWEST} or more)"
        )
    elif prefill.wide:
        reasons["prefill_spread"] = (
            f"prefill times spread {prefill.relative_iqr:.1%} (IQR over median; over {SPREAD_LIMIT:.0%})"
        )
    if under.steps < FEWEST:
        reasons["few_steps"] = (
            f"{under.steps} decoding step{'s' if under.steps > 1 else ''}: too few for a spread ({FEWEST} or more)"
        )
    elif decode.wide:
        reasons["decode_spread"] = f"decode step times spread {decode.relative_iqr:.1%} (over {SPREAD_LIMIT:.0%})"
    # The vision tower, the embeddings and the prompt's text cost the same pruned or not, so a
    # pruned prefill takes at least its share of the whole prompt's FLOPs: a ratio under it is noise.
    if ratio is not None and ratio.high < prompt_flops_ratio:
        reasons["under_flops"] = (
            f"time {ratio.median:.1%} of vanilla (at most {ratio.high:.1%}) is under the prompt's FLOPs ratio "
            f"{prompt_flops_ratio:.1%}, which no prefill can beat"
        )
    if oversubscribed(under.threads + (under.busy or 0.0), under.cpus):
        reasons["load"] = (
            f"{under.threads} thread{'s' if under.threads > 1 else ''} and {under.busy or 0.0:.1f} CPUs of other work "
            f"on the {under.cpus} CPUs this process may use"
        )
    return Verdict(reasons)


def indistinct(intervals: dict[str, Interval]) -> list[list[str]]:
    """Groups of two or more names whose intervals chain into each other: a run that cannot tell
    them apart by time (sorted by median; each group in that order)."""
    ordered = sorted(intervals, key=lambda name: intervals[name].median)
    groups: list[list[str]] = []
    for name in ordered:
        if groups and any(intervals[other].overlaps(intervals[name]) for other in groups[-1]):
            groups[-1].append(name)
        else:
            groups.append([name])
    return [group for group in groups if len(group) > 1]
