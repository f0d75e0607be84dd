"""How the default thread count and the stability verdict fare on an idle and on a busy machine
(issue 33): each command run with the default threads, --threads 1 and --threads 2, first with
nothing else running, then beside BUSY busy-loop processes, one per core; its wall time, the
threads it chose, and the verdict of `asap profile`. A Markdown report on stdout.

    python scripts/busy_check.py [--busy 2] [--timeout 900] [--only profile|eval] > busy-check.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

PROFILE = ["profile", "-m", "bench", "-k", "128", "--methods", "vanilla,fastv,asap", "--json"]
EVAL = ["eval", "--n", "50", "--methods", "vanilla,fastv,asap", "-k", "128", "--json"]
THREADS = {"default": [], "1": ["--threads", "1"], "2": ["--threads", "2"]}


@contextlib.contextmanager
def busy(processes: int):
    """`processes` Python busy loops, ended on leaving."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(2 if loops else 0)  # runnable before the command looks at the machine
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def run(arguments: list[str], timeout: float) -> dict:
    """One command: its wall time, exit status, JSON lines and stderr's warning."""
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "asapcli", *arguments],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "status": "timeout", "records": [], "warning": ""}
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    warning = next((line for line in done.stderr.splitlines() if line.startswith("Warning:")), "")
    return {"seconds": seconds, "status": done.returncode, "records": records, "warning": warning}


def threads_used(records: list[dict]) -> str:
    for record in records:
        environment = record.get("environment", {})
        if environment.get("threads") is not None:
            return str(environment["threads"])
    return "?"


def profile_cells(records: list[dict]) -> str:
    cells = []
    for row in records:
        interval = row["time_ratio_interval"]
        ratio = "" if row["k"] is None else f" {row['time_ratio']:.1%} [{interval[0]:.1%}, {interval[1]:.1%}]"
        cells.append(f"{row['method']} {row['prefill_seconds'] * 1000:.0f} ms{ratio}")
    stable = all(row["stable"] for row in records)
    return "; ".join(cells) + ("; stable" if stable else "; unstable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy loops beside the command")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a command is given up")
    parser.add_argument("--only", choices=("profile", "eval"), help="one of the two commands")
    args = parser.parse_args()
    commands = {"profile": PROFILE, "eval": EVAL}
    if args.only:
        commands = {args.only: commands[args.only]}
    print(f"{os.cpu_count()} CPUs; load before: {os.getloadavg()[0]:.1f}\n")
    print("| machine | command | --threads | threads used | wall s | figures |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for condition, loops in (("idle", 0), (f"{args.busy} busy loops", args.busy)):
        with busy(loops):
            for name, arguments in commands.items():
                for label, option in THREADS.items():
                    found = run(arguments + option, args.timeout)
                    seconds = "timeout" if found["seconds"] is None else f"{found['seconds']:.0f}"
                    figures = profile_cells(found["records"]) if name == "profile" and found["records"] else ""
                    if found["status"] not in (0, "timeout"):
                        figures = f"exit {found['status']}"
                    row = [condition, name, label, threads_used(found["records"]), seconds, figures]
                    print("| " + " | ".join(row) + " |", flush=True)
                    if found["warning"]:
                        print(f"|  |  |  |  |  | {found['warning'][:300]} |", flush=True)


if __name__ == "__main__":
    main()
