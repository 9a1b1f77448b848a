"""Which TCP sockets a command's processes listen on, watched while it runs (tests/reliability/
test_listeners.py asserts on what the reference demo pipeline's processes listened on)."""

from __future__ import annotations

import re
import subprocess
import time

from common.process import descendants


def listeners() -> list[tuple[str, str, int]]:
    """(local address, process name, pid) of every listening TCP socket."""
    r = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    found = []
    for line in r.stdout.splitlines():
        cols = line.split()
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            found.append((cols[3], name, int(pid)))
    return found


def watch_listeners(proc: subprocess.Popen, every: float = 0.3) -> set[tuple[str, str]]:
    """(local address, process name) of every socket that `proc` or a process below it listened on
    while it ran; returns when it has ended."""
    seen: set[tuple[str, str]] = set()
    while proc.poll() is None:
        tree = {proc.pid, *descendants(proc.pid)}
        seen |= {(addr, name) for addr, name, pid in listeners() if pid in tree}
        time.sleep(every)
    return seen
