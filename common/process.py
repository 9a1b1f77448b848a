"""Process-level helpers shared by the CLI, the stages and the trainer they launch. Standard
library only: the CLI uses them without loading torch or Prefect."""

from __future__ import annotations

import sys


_worker_cpu = [0.0]  # CPU seconds that worker processes (not our waited children) reported


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report_worker_cpu(seconds: float) -> None:
    """A worker process that this process does not wait for (a forkserver's child: datatrove's
    tasks, the WARC checks) reports the CPU it spent on our work."""
    _worker_cpu[0] += seconds  # a float add under the GIL: no lost update between threads


def cpu_seconds() -> float:
    """CPU seconds of every process working for this one so far: itself, the children it waited
    for (torchrun and its ranks: torchrun waits for them) and the workers that reported theirs.
    A stage's cost is the difference over its run (tasks/stage.py records it in the manifest)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own_cpu_seconds() + c.ru_utime + c.ru_stime + _worker_cpu[0]


def is_storage_error(e: BaseException) -> bool:
    """An OSError, or an error of the S3 client stack that is not one (botocore, aiohttp)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs")


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies. A stage killed with -9 must not leave
    a launcher or workers behind, writing checkpoints next to the rerun's."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def how_it_ended(exit_code: int) -> str:
    """'was killed by SIGKILL (the out-of-memory killer?)' or 'exited with status 3': how a
    process ended, from a Popen-style exit code (negative: the signal)."""
    import signal

    if exit_code >= 0:
        return f"exited with status {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    return f"was killed by {name}" + (" (the out-of-memory killer?)" if -exit_code == signal.SIGKILL else "")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first, then theirs), read from /proc (Linux)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def kill_descendants(pid: int | None = None) -> int:
    """SIGKILL every process below `pid` (default: this one); returns how many were signalled."""
    import os
    import signal

    victims = descendants(os.getpid() if pid is None else pid)
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)
