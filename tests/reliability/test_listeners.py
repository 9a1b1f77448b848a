"""Every server a stage starts listens on loopback: the CLI's temporary Prefect server, gloo's
sockets between the training ranks. One known exception, asserted so that it is noticed when it
changes: torchrun's TCPStore (the rendezvous key-value store, process name `pt_elastic`) listens
on all interfaces and torch 2.13 has no option to bind it elsewhere (docs/RELIABILITY.md)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from tasks.lake import Lake
from tests.conftest import BIN, QUICK, copy_version, temp_server_env

TORCHRUN_STORE = "pt_elastic"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def listeners() -> list[tuple[str, str, int]]:
    """(local address, process name, pid) of every listening TCP socket."""
    r = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    found = []
    for line in r.stdout.splitlines():
        cols = line.split()
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            found.append((cols[3], name, int(pid)))
    return found


def test_a_training_stage_listens_on_loopback_only(demo_local_run, demo_mirror, tmp_path):
    reference = Lake(demo_local_run[0]).resolve("pretrain")
    lake = Lake(str(tmp_path / "lake"))
    for upstream in reference.inputs:
        copy_version(Lake(demo_local_run[0]), lake, upstream)
    proc = subprocess.Popen([str(BIN / "crawl2model"), "--lake", lake.url, "run", "--preset", "demo", *QUICK,
                             "--set", "pretrain.max_steps=40", "--from", "pretrain"], cwd=demo_mirror.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=temp_server_env())  # the CLI's temporary Prefect server is one of them
    seen: set[tuple[str, str]] = set()
    while proc.poll() is None:
        tree = descendants(proc.pid)
        seen |= {(addr, name) for addr, name, pid in listeners() if pid in tree}
        time.sleep(0.3)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    loopback = {(a, n) for a, n in seen if a.startswith(("127.0.0.1:", "[::1]:"))}
    exposed = seen - loopback
    names = {n for _, n in loopback}
    assert len(loopback) >= 3, seen  # the Prefect server and one gloo socket per rank at least
    assert any(n.startswith("python") for n in names), seen
    assert {n for _, n in exposed} <= {TORCHRUN_STORE}, f"listening beyond loopback: {exposed}"
