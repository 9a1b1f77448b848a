"""Helpers for side-by-side benchmarks: medians over repeats, rows into RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).with_name("RESULTS.md")


def median_seconds(fn: Callable[[], object], repeats: int = 5, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def alternating_medians(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median wall seconds of each function, run in turn (ours, peer, ours, peer, ...) so that a
    noisy stretch of the machine falls on all of them."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def record(metric: str, ours: str, peer: str, ratio: float, command: str) -> None:
    row = (f"| {metric} | {ours} | {peer} | {ratio:.2f} | {dt.date.today().isoformat()} | "
           f"{machine()} | `{command}` |\n")
    with RESULTS.open("a") as f:
        f.write(row)
    print(row, end="")


CGROUP_CPUACCT = Path("/sys/fs/cgroup/cpuacct")


def run_measured(args: list[str], **popen) -> dict:
    """Run a command to its end; its CPU seconds over every process it starts (a cpuacct cgroup of
    its own where this machine lets us make one, else os.wait4's user + sys of the child and the
    descendants it reaped), peak RSS of its largest process, wall seconds and stderr."""
    import subprocess
    import uuid

    group = CGROUP_CPUACCT / f"c2m-bench-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError:
        group = None

    def enter_group() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    t = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=enter_group, **popen)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    cpu, how = ru.ru_utime + ru.ru_stime, "wait4"
    if group is not None:
        for pid in (group / "cgroup.procs").read_text().split():  # strays: they were counted, now go
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        cpu, how = int((group / "cpuacct.usage").read_text()) / 1e9, "cgroup"
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return {"cpu": cpu, "cpu_counted_by": how, "rss_gib": ru.ru_maxrss / 2**20, "wall": wall,
            "returncode": os.waitstatus_to_exitcode(status), "stderr": err.decode(errors="replace")}
