"""datatrove's Slurm executor behind `--executor slurm`, on a one-node Slurm cluster (Debian's
slurm-wlm and munge) that the test starts: munged with a key of its own, slurmctld and slurmd from
a slurm.conf of its own, all in a network namespace of their own. Slurm's daemons listen on every
address they have (0.0.0.0:6817 and :6818, no option binds them to one): in that namespace those
are loopback and a veth pair whose both ends stay inside, so nothing reaches beyond it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tasks.lake import Lake
from tests.corpus import documents, lake_with_curated_download
from tests.netns import Namespace, netns_available

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

if not netns_available() or not all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")):
    pytest.skip("needs root, Debian's slurm-wlm and munge (make system-deps installs them)", allow_module_level=True)

SLURM_CONF = """\
ClusterName=c2m
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
NodeName=c2m NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=c2m Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    """munged, slurmctld and slurmd of a one-node cluster (2 CPUs), in a namespace of their own."""
    ns = Namespace("slurm")
    d = Path(tempfile.mkdtemp(prefix="c2m-slurm-"))
    try:
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        (d / "munge.key").write_bytes(os.urandom(1024))
        os.chmod(d / "munge.key", 0o400)
        (d / "slurm.conf").write_text(SLURM_CONF.format(d=d, host=socket.gethostname()))
        # cgroup v1 as this machine mounts it (Slurm's autodetection takes the tmpfs above it for none)
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
        # glibc resolves even "127.0.0.1" only when a non-loopback address exists (AI_ADDRCONFIG): a
        # veth pair whose both ends stay in the namespace gives it one, with no way out
        ns.run("ip", "link", "add", "c2m0", "type", "veth", "peer", "name", "c2m1", check=True)
        ns.run("ip", "addr", "add", "10.255.255.1/32", "dev", "c2m0", check=True)
        for dev in ("c2m0", "c2m1"):
            ns.run("ip", "link", "set", dev, "up", check=True)
        env = {"SLURM_CONF": str(d / "slurm.conf")}
        ns.env.update(env)
        for cmd in (["munged", "--force", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                    ["slurmctld", "-f", str(d / "slurm.conf")],
                    ["slurmd", "-f", str(d / "slurm.conf"), "-N", "c2m"]):
            r = ns.run(*cmd, timeout=60)
            assert r.returncode == 0, (cmd, r.stdout, r.stderr, _logs(d))
        deadline = time.time() + 60
        while "idle" not in ns.run("sinfo", "-h", "-o", "%T").stdout:
            assert time.time() < deadline, _logs(d)
            time.sleep(0.5)
        yield {"ns": ns, "dir": d}
    finally:
        ns.close()
        shutil.rmtree(d, ignore_errors=True)


def _logs(d: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(d.glob("*.log")))


FILTER = textwrap.dedent("""
    import json, sys
    from tasks.filter import FilterParams, filter_documents
    from tasks.errors import StageError
    from tasks.lake import Lake

    if __name__ == "__main__":
        try:
            m = filter_documents(Lake(sys.argv[1]), FilterParams(**json.loads(sys.argv[2]), executor="slurm"))
        except StageError as e:
            print("ERROR", e)
            sys.exit(1)
        print("RESULT", json.dumps({"ref": m.ref, "files": {f["path"]: f["sha256"] for f in m.files},
                                    "cpu": m.metrics["cpu_seconds"]}))
""")


def test_filter_on_slurm_commits_the_local_executors_files_and_a_cancelled_job_resumes(slurm, curated_corpus,
                                                                                        tmp_path):
    """filter as a Slurm job array: (1) the curated corpus's filter version, file for file as the
    local executor wrote it; (2) another version (8 tasks) cancelled from outside (`scancel`) while
    it runs: the stage fails with one line and commits nothing; the same command again runs only
    the unfinished tasks and commits the same documents."""
    ns = slurm["ns"]
    src, reference, lake = lake_with_curated_download(curated_corpus, tmp_path)
    script = tmp_path / "filter_on_slurm.py"
    script.write_text(FILTER)

    def filter_on_slurm(params: dict) -> subprocess.Popen:
        return ns.popen(sys.executable, str(script), str(lake), json.dumps(params))

    # (1) the curated corpus's own filter version, on Slurm: the same files
    proc = filter_on_slurm(reference.params)
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-3000:] + _logs(slurm["dir"])
    result = json.loads(text.split("RESULT ", 1)[1])
    assert (result["ref"], result["files"]) == (reference.ref, {f["path"]: f["sha256"] for f in reference.files})
    assert result["cpu"] > 1  # the jobs' CPU, reported by each task next to its marker

    # (2) 8 tasks (another version), the job cancelled once a task is done; then the same command
    lake_ = Lake(str(lake))
    again = {**reference.params, "tasks": 8}
    proc = filter_on_slurm(again)
    completions = lambda: [p for p in lake_.files_under(lake_.path("filter")) if "/completions/" in p]  # noqa: E731
    deadline = time.time() + 300
    while not completions():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    queued = ns.run("squeue", "-h", "-o", "%A").stdout.split()
    assert queued
    ns.run("scancel", *set(queued))
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, text[-3000:]
    error = text.split("ERROR ", 1)[1].strip()
    assert re.match(r"filter@[0-9a-f]{16}: Slurm job \d+ ended with \d of 8 datatrove tasks unfinished \(their logs: "
                    r".+\); the tasks that finished are kept, rerun to resume$", error), error
    [version] = [v for v in lake_._version_dirs("filter") if f"filter@{v}" != reference.ref]
    assert lake_.manifest("filter", version) is None  # nothing committed
    finished = len(completions())
    assert 1 <= finished < 8
    proc = filter_on_slurm(again)
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-3000:]
    result = json.loads(text.split("RESULT ", 1)[1])
    assert result["ref"] == f"filter@{version}"
    assert f"({8 - finished} tasks)" in text  # datatrove's "Launching Slurm job ... (N tasks)": only the rest
    assert documents(lake_, lake_.resolve(result["ref"])) == documents(src, reference)


def test_slurm_is_for_the_datatrove_stages_and_needs_sbatch(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from tasks.download import DownloadParams
    from tasks.filter import FilterParams

    with pytest.raises(ValidationError, match="Input should be 'local' or 'ray'"):
        DownloadParams(urls=["file:///x.warc.gz"], executor="slurm")
    with pytest.raises(ValidationError, match="slurm_partition is for executor 'slurm'"):
        FilterParams(slurm_partition="debug")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ValidationError, match="executor 'slurm' needs Slurm's sbatch on PATH"):
        FilterParams(executor="slurm")
