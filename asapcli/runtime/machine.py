"""What the CPU a command runs on is doing: the CPUs this process may use, how many of them other
work keeps busy, and from that the PyTorch thread count that does not oversubscribe them.

PyTorch's own default is one thread per core, whatever else runs: on 2 cores that another
process keeps busy, its threads wait on each other at every parallel op and a prefill takes
5-30x longer than on 1 thread. Imports no torch (the CLI asks it before the heavy import).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

PROC_LOADAVG = Path("/proc/loadavg")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# The runnable tasks are read this many times, this far apart: a busy process is runnable at every
# read, a short burst at few (one read is a coin toss on a machine that runs builds); 20 ms in all.
SAMPLES, INTERVAL_SECONDS = 10, 0.002


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a
    container's --cpus) where one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota)) if quota else cpus


def _cgroup_quota() -> int | None:
    """cgroup v2's cpu.max ("QUOTA PERIOD", or "max PERIOD" for none), in whole CPUs rounded up."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def load_average() -> float | None:
    """The 1-minute load average (runnable tasks, this process's threads included); None where the
    system keeps none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def runnable_elsewhere() -> int | None:
    """Tasks of other processes runnable now: the system's count (the 4th field of /proc/loadavg,
    the load average's own source) less this process's runnable threads (/proc/self/task). System
    wide: work pinned to CPUs this process may not use counts too. None off Linux."""
    try:
        running = int(PROC_LOADAVG.read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - _own_runnable())


def _own_runnable() -> int:
    """This process's threads in state R (the reading one at least)."""
    count = 0
    for task in Path("/proc/self/task").glob("*/stat"):
        try:
            state = task.read_text().rsplit(")", 1)[1].split()[0]  # after the command's "(name)"
        except (OSError, IndexError):
            continue
        count += state == "R"
    return max(1, count)


def busy_elsewhere(samples: int = SAMPLES) -> float | None:
    """CPUs that other work keeps busy now: runnable_elsewhere() averaged over `samples` reads
    INTERVAL_SECONDS apart (a job that started a second ago counts; the 1-minute load average would
    not show it yet). None off Linux."""
    counts = []
    for index in range(samples):
        count = runnable_elsewhere()
        if count is None:
            return None
        counts.append(count)
        if index + 1 < samples:
            time.sleep(INTERVAL_SECONDS)
    return sum(counts) / len(counts)


# Other work under a quarter of a CPU on average (a shell, a monitor) is not worth a thread.
SLACK = 0.25


def threads_for(cpus: int, busy: float | None) -> int:
    """The threads that keep to the CPUs left free: `cpus` less `busy`, rounded down past SLACK,
    at least 1; so that threads + busy stays within cpus + SLACK (stability.oversubscribed's
    rule). Unknown load: every CPU (PyTorch's own choice)."""
    if busy is None:
        return cpus
    return max(1, min(cpus, math.floor(cpus - busy + SLACK)))


THREADS_RULE = (
    "the CPUs this process may use (affinity, cgroup quota) less those other work keeps busy now "
    "(runnable tasks of other processes), at least 1; OMP_NUM_THREADS where set"
)


def choose_threads(given: int | None = None) -> int:
    """The CPU threads a command uses: `given` (--threads) where given, else OMP_NUM_THREADS where
    the user set it (PyTorch reads it), else threads_for() on this machine now."""
    if given is not None:
        return given
    variable = os.environ.get("OMP_NUM_THREADS", "").strip()
    if variable.isdigit() and int(variable) >= 1:
        return int(variable)
    return threads_for(available_cpus(), busy_elsewhere())


def surely_no_cuda() -> bool:
    """No CUDA GPU can be here, told without importing torch: none made visible
    (CUDA_VISIBLE_DEVICES empty or -1), or a Linux with no NVIDIA driver loaded. False where
    it cannot be told (another system): torch is asked then."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return True
    if not Path("/proc").is_dir():
        return False
    return not Path("/proc/driver/nvidia").exists() and not list(Path("/dev").glob("nvidia[0-9]*"))


@functools.cache
def cpu_model() -> str | None:
    """The processor's name, as /proc/cpuinfo (or the platform) gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


@functools.cache
def gpu_driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (PyTorch knows only the CUDA API it was built
    for); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.splitlines()[0].strip() if found.stdout.strip() else None
