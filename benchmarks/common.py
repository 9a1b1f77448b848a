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


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def record(metric: str, ours: str, peer: str, ratio: float, command: str) -> None:
    row = (f"| {metric} | {ours} | {peer} | {ratio:.2f} | {dt.date.today().isoformat()} | "
           f"{machine()} | `{command}` |\n")
    with RESULTS.open("a") as f:
        f.write(row)
    print(row, end="")
