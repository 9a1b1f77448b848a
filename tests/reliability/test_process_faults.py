"""Process faults: SIGKILL each stage of the demo pipeline at a random point while it produces
its version, then rerun. Nothing half-written is ever visible as committed, and the rerun's
version and file hashes equal the uninterrupted run's (for pretrain that includes metrics.json,
the loss curve, and the final weights)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tasks.lake import Lake, Manifest
from tests.conftest import BIN, QUICK, STAGES, copy_version, temp_server_env
from tests.listening import listeners

SEED = int(os.environ.get("C2M_KILL_SEED", random.randrange(1 << 16)))


def stage_seconds(log: str) -> dict[str, float]:
    """Each stage's duration in the reference run, from the pipeline's own log lines."""
    return {m[1]: float(m[2]) for m in re.finditer(r" - (\w+) -> \w+@[0-9a-f]{16} \(([\d.]+)s\)", log)}


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process below `root` by parent pid: torchrun's own session,
    datatrove's forkserver and its tasks, Prefect's temporary server."""
    children: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def still_running(procs: dict[int, str]) -> list[str]:
    """Those of `procs` alive now (same pid and start time, not a zombie), with their command."""
    alive = []
    for pid, start in procs.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(f"{pid} {cmd}")
    return alive


def none_left(procs: dict[int, str], why: str, within: float = 10) -> None:
    deadline = time.time() + within
    while (left := still_running(procs)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the killed stage: {left} {why}"


def stage_alone(ref_url: str, stage: str, tmp_path: Path) -> tuple[Manifest, Path, Lake, list[str]]:
    """A fresh lake holding the reference's inputs of `stage` (by value: the same version is
    produced), and the command that runs that stage alone on it."""
    reference = Lake(ref_url).resolve(stage)
    lake_dir = tmp_path / "lake"
    lake = Lake(str(lake_dir))
    for upstream in reference.inputs:
        copy_version(Lake(ref_url), lake, upstream)
    cmd = [str(BIN / "crawl2model"), "--lake", str(lake_dir), "run", "--preset", "demo", *QUICK,
           "--from", stage, "--to", stage]
    return reference, lake_dir, lake, cmd


def start_logged(cmd: list[str], cwd: Path, tmp_path: Path, env: dict | None = None) -> subprocess.Popen:
    """The command in a session of its own, stderr to a file (not a pipe nobody reads while we wait)."""
    log = open(tmp_path / "stderr", "w+")
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, env=env)


def error_line_of_failed(proc: subprocess.Popen, tmp_path: Path, what: str, within: float) -> str:
    """The failed stage's last `error:` line, once it ended (exit 1) within `within` seconds."""
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the stage hung after {what}")
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 1, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error:")][-1]


# conversations takes a fraction of a second (nothing to kill in the middle of) and sft's kill and
# resume are pretrain's trainer's (tests/test_sft.py kills a 2-rank SFT run and resumes its curve)
@pytest.mark.parametrize("stage", STAGES[:STAGES.index("pretrain") + 1])
def test_sigkill_at_a_random_point_then_rerun_equals_an_uninterrupted_run(stage, demo_local_run, demo_mirror,
                                                                          tmp_path):
    ref_url, ref_run = demo_local_run
    took = stage_seconds(ref_run.stderr + ref_run.stdout)
    assert stage in took, "the reference run logs each stage's duration"
    rng = random.Random(f"{SEED}-{stage}")
    delay = rng.uniform(0.05, 0.95) * took[stage]
    why = f"(C2M_KILL_SEED={SEED}: killed {delay:.1f}s after its lease appeared)"

    reference, lake_dir, lake, cmd = stage_alone(ref_url, stage, tmp_path)
    proc = subprocess.Popen(cmd, cwd=demo_mirror.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: torchrun and datatrove workers die too
    lease = lake_dir / stage / reference.version / "_lease"
    deadline = time.time() + 300
    while not lease.exists():
        assert proc.poll() is None and time.time() < deadline, f"{stage} never started producing {why}"
        time.sleep(0.05)
    time.sleep(delay)
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its group (datatrove's workers)
    proc.wait()
    none_left(below, why)  # torchrun runs in a session of its own: it must die with the stage

    # Nothing half-written is visible: either no version, or the complete one.
    for m in lake.versions(stage):
        assert m.version == reference.version and lake.verify(m) == [], why
    killed_before_commit = not lake.versions(stage)

    r = subprocess.run(cmd, cwd=demo_mirror.parent, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{why}\n{r.stderr[-3000:]}"
    again = lake.resolve(stage)
    assert again.version == reference.version, why
    assert {f["path"]: f["sha256"] for f in again.files} == {f["path"]: f["sha256"] for f in reference.files}, why
    assert lake.verify(again) == []
    leftovers = [p for p in (lake_dir / stage / again.version).iterdir() if p.name.startswith("_") and
                 p.name != "_MANIFEST.json"]
    assert not leftovers, f"{leftovers} {why}"
    if killed_before_commit:
        assert "built now" in r.stdout, why


def datatrove_worker(stage_pid: int, deadline: float) -> int:
    """The pid of a datatrove worker below the stage (a child of the forkserver), running a task."""
    while time.time() < deadline:
        for pid in descendants(stage_pid):
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if b"multiprocess.forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError("no datatrove worker appeared")


def test_a_killed_datatrove_task_fails_the_stage_and_a_killed_stage_takes_its_processes(
        demo_local_run, demo_mirror, tmp_path):
    """What the out-of-memory killer does: SIGKILL one process, not a group. (1) A datatrove worker
    killed: the stage ends at once with an error naming it (a multiprocessing Pool waited for it
    forever). (2) The stage's main process alone killed: its tasks, the forkserver and Prefect's
    temporary server die with it (they ran on; the tasks kept writing beside a rerun). (3) The
    rerun skips the finished tasks and produces the uninterrupted run's version, byte for byte."""
    reference, lake_dir, lake, cmd = stage_alone(demo_local_run[0], "filter", tmp_path)
    completions = lake_dir / "filter" / reference.version / "_work" / "logs" / "completions"

    # (1) one task killed
    proc = start_logged(cmd, demo_mirror.parent, tmp_path)
    os.kill(datatrove_worker(proc.pid, time.time() + 120), signal.SIGKILL)
    last = error_line_of_failed(proc, tmp_path, "one of its datatrove tasks was killed", within=60)
    assert last.startswith(f"error: filter@{reference.version}: datatrove task ") and \
        "was killed by SIGKILL (the out-of-memory killer?)" in last and "rerun to resume" in last, last
    assert lake.versions("filter") == []

    # (2) the stage's main process alone killed, once a task has finished and another runs; without
    # the session's Prefect server, so that the CLI's temporary server is in the tree and must die
    proc = start_logged(cmd, demo_mirror.parent, tmp_path, env=temp_server_env())
    deadline = time.time() + 120
    while not (completions.exists() and any(completions.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "no task finished"
        time.sleep(0.05)
    datatrove_worker(proc.pid, deadline)
    below = descendants(proc.pid)
    assert any(b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes() for p in below if Path(f"/proc/{p}").exists())
    served = [(addr, name) for addr, name, pid in listeners() if pid in below]  # the temporary server's
    assert served and all(addr.startswith(("127.0.0.1:", "[::1]:")) for addr, _ in served), served
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    none_left(below, "(after SIGKILL of the stage's main process only)")
    assert lake.versions("filter") == []

    # (3) the rerun
    finished = len(list(completions.iterdir()))
    r = subprocess.run(cmd, cwd=demo_mirror.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert finished >= 1
    skipped = f"Skipping {finished} already completed tasks" if finished < 4 else "all 4 tasks have already"
    assert skipped in r.stderr, r.stderr[-3000:]
    again = lake.resolve("filter")
    assert again.version == reference.version
    assert {f["path"]: f["sha256"] for f in again.files} == {f["path"]: f["sha256"] for f in reference.files}
    assert again.metrics["funnel"] == reference.metrics["funnel"]


@pytest.mark.parametrize("victim", ["rank", "torchrun"])
def test_a_killed_training_rank_or_launcher_is_a_clear_error_and_takes_the_rest(victim, demo_local_run, demo_mirror,
                                                                                 tmp_path):
    """SIGKILL one training rank (the biggest process, so the out-of-memory killer's pick), or the
    torchrun launcher alone: the stage ends with one line saying which and how, nothing is
    committed, and no process of the training is left."""
    _, _, lake, cmd = stage_alone(demo_local_run[0], "pretrain", tmp_path)
    proc = start_logged(cmd, demo_mirror.parent, tmp_path)
    deadline = time.time() + 180
    launcher = ranks = None
    while not ranks:  # torchrun and its 2 ranks, training
        assert proc.poll() is None and time.time() < deadline, "training never started"
        for pid in descendants(proc.pid):
            try:
                if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    launcher = pid
                    ranks = sorted(descendants(pid))
            except OSError:
                continue
        time.sleep(0.05)
    time.sleep(3)
    below = descendants(proc.pid)
    os.kill(ranks[-1] if victim == "rank" else launcher, signal.SIGKILL)
    last = error_line_of_failed(proc, tmp_path, f"its {victim} was killed", within=90)
    who = r"rank \d" if victim == "rank" else "torchrun"
    assert re.fullmatch(rf"error: training failed \(torchrun exit -?\d+\): {who} was killed by SIGKILL \(the "
                        r"out-of-memory killer\?\); checkpoints written so far are kept, rerun to resume", last), last
    none_left(below, f"(after SIGKILL of the {victim})")
    assert lake.versions("pretrain") == []


def test_bad_training_input_is_one_line_exit_2_and_leaves_nothing(demo_local_run, demo_mirror, tmp_path):
    """Input the ranks refuse (a vocabulary smaller than the shards'): each rank checks before it
    builds the model, so the launch ends in seconds with model.train's one line, exit 2 (bad
    input), no traceback, nothing committed and no process left."""
    _, _, lake, cmd = stage_alone(demo_local_run[0], "pretrain", tmp_path)
    proc = start_logged([*cmd, "--set", "pretrain.vocab_size=64"], demo_mirror.parent, tmp_path)
    below: dict[int, str] = {}
    while proc.poll() is None:
        below.update(descendants(proc.pid))
        time.sleep(0.05)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: model vocab_size 64 is smaller than the shards' vocab_size \d+ \(meta.json of .+\)",
                        last), last
    assert "Traceback" not in err
    none_left(below, "(after bad input)")
    assert lake.versions("pretrain") == []


def test_two_nodes_train_as_one_node_of_two_ranks_and_resume_after_a_node_is_killed(demo_local_run, demo_mirror,
                                                                                     tmp_path):
    """`--nnodes 2 --node-rank R --rdzv-endpoint H:P` (torchrun's c10d rendezvous) on loopback,
    one process a node: node 1 is SIGKILLed after the first checkpoint, node 0 then fails with
    one line and commits nothing; relaunched, the two nodes resume from that checkpoint and
    node 0 commits the same version, file for file (weights, loss curve, checkpoints), as the
    reference's one node of two ranks (gloo on CPU is bit-identical)."""
    from tests.conftest import free_port

    reference, lake_dir, lake, cmd = stage_alone(demo_local_run[0], "pretrain", tmp_path)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}  # 2 "nodes" on 2 cores

    def nodes() -> list[subprocess.Popen]:
        port, procs = free_port(), []
        for rank in (0, 1):  # node 0 first: its launcher hosts the rendezvous store
            node = [*cmd, "--set", "pretrain.nproc_per_node=1", "--set", "pretrain.nnodes=2", "--set",
                    f"pretrain.node_rank={rank}", "--set", f"pretrain.rdzv_endpoint=127.0.0.1:{port}"]
            (tmp_path / f"node{rank}").mkdir(exist_ok=True)
            procs.append(start_logged(node, demo_mirror.parent, tmp_path / f"node{rank}", env))
            time.sleep(0.5)
        return procs

    node0, node1 = nodes()
    first = lake_dir / "pretrain" / reference.version / "checkpoints" / "step-000010" / "trainer.json"
    deadline = time.time() + 300
    while not first.exists():
        assert node0.poll() is None and node1.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    os.killpg(node1.pid, signal.SIGKILL)
    node1.wait()
    last = error_line_of_failed(node0, tmp_path / "node0", "node 1 was killed", within=120)
    assert last.startswith("error: training failed (torchrun exit") and "rerun to resume" in last, last
    assert lake.versions("pretrain") == []

    node0, node1 = nodes()
    for rank, proc in enumerate((node0, node1)):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"node{rank}" / "stderr").read_text()[-3000:]
    log0, log1 = ((tmp_path / f"node{rank}" / "stderr").read_text() for rank in (0, 1))
    # c10d gives global rank 0 (which logs the resume) to either node, by the order they joined
    assert "checkpoints/step-000010 at step 10" in log0 + log1, log0[-2000:] + log1[-2000:]
    assert f"pretrain@{reference.version}: committed by node 0" in log1
    again = lake.resolve("pretrain")
    assert again.version == reference.version
    assert {f["path"]: f["sha256"] for f in again.files} == {f["path"]: f["sha256"] for f in reference.files}
