"""The data stages on a real Ray cluster: a head and a second node started with `ray start`, in a
network namespace of their own where only loopback exists. Ray binds its daemons to the node's
address, 127.0.0.1 there, so nothing reaches beyond loopback (and the main namespace's listener
test, tests/reliability/test_listeners.py, never sees them). The stages run there too, as a user
runs them: `crawl2model` or the stage function, joining the cluster at its head's address."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from tasks.lake import Lake
from tests.conftest import BIN
from tests.corpus import documents, lake_with_curated_download
from tests.netns import Namespace, netns_available

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]
HEAD_PORT = 6379  # the namespace is new: nothing else listens there

if not netns_available():
    pytest.skip("ip netns needs root (CI and this machine run as root)", allow_module_level=True)


def start_ray(ns: Namespace, temp_dir: Path, head_cpus: int, more_nodes: list[int], wrap: tuple = ()) -> str:
    """`ray start` a head (and a node per entry of `more_nodes`, its CPUs) in `ns`; its address.
    `wrap` is put before the head's command (a mount namespace, say)."""
    ray = str(BIN / "ray")
    head = [*wrap, ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={HEAD_PORT}",
            f"--num-cpus={head_cpus}", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    r = ns.run(*head, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    address = f"127.0.0.1:{HEAD_PORT}"
    for cpus in more_nodes:
        r = ns.run(ray, "start", f"--address={address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                   "--disable-usage-stats", timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return address


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node Ray cluster (2 + 1 CPUs) on loopback, for this module's tests."""
    ns = Namespace("ray")
    temp = Path(f"/tmp/c2m-ray-{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths must fit in 107 bytes
    try:
        address = start_ray(ns, temp, head_cpus=2, more_nodes=[1])
        yield {"ns": ns, "address": address}
    finally:
        ns.close()
        shutil.rmtree(temp, ignore_errors=True)


def watch(ns: Namespace, proc: subprocess.Popen, every: float = 0.3) -> set[str]:
    """Every listening address in `ns` while `proc` runs."""
    seen: set[str] = set()
    while proc.poll() is None:
        seen |= set(ns.listeners())
        time.sleep(every)
    return seen


def files_of(m) -> tuple[str, dict[str, str]]:
    return m.ref, {f["path"]: f["sha256"] for f in m.files}


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or host.startswith("127.")


def test_the_pipeline_on_a_two_node_ray_cluster_commits_the_local_executors_files(ray_cluster, demo_local_run,
                                                                                   demo_mirror, tmp_path):
    """`run --executor ray` from download to shard on the cluster: the same versions, file for
    file (sha256), as the local executor's demo run; both nodes worked; every socket of the
    cluster and of the run listened on loopback only."""
    ns, lake = ray_cluster["ns"], tmp_path / "lake"
    proc = ns.popen(str(BIN / "crawl2model"), "--lake", str(lake), "run", "--preset", "demo", "--to", "shard",
                    "--executor", "ray", "--ray-address", ray_cluster["address"], cwd=demo_mirror.parent,
                    env={"PREFECT_HOME": str(tmp_path / "ph")})
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    listening = watch(ns, proc)
    proc.wait(600)
    reader.join(10)
    text = "".join(out)
    assert proc.returncode == 0, text[-4000:]
    assert "on the Ray cluster at 127.0.0.1:6379: 2 node(s), 3 CPUs, each sees the lake" in text, text[-3000:]
    assert re.search(r"\d+ Ray task\(s\) ran on 2 node\(s\)", text), re.findall(r".*Ray task.*", text)
    ours, local = Lake(str(lake)), Lake(demo_local_run[0])
    for kind in ("download", "filter", "dedup", "tokenizer", "shard"):
        assert files_of(ours.resolve(kind)) == files_of(local.resolve(kind)), kind
    assert listening and all(is_loopback(a) for a in listening), sorted(listening)
    assert any(a.endswith(f":{HEAD_PORT}") for a in listening)  # the head's own port was seen


FILTER = textwrap.dedent("""
    import json, sys
    from tasks.filter import FilterParams, filter_documents
    from tasks.lake import Lake

    if __name__ == "__main__":
        lake, address, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        m = filter_documents(Lake(lake), FilterParams(**extra, executor="ray", ray_address=address))
        print("RESULT", json.dumps({"ref": m.ref, "files": {f["path"]: f["sha256"] for f in m.files}}))
""")


def ray_task_pids() -> list[int]:
    """Ray worker processes running one of our tasks now (Ray titles a busy worker ray::<function>)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::_timed"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def wait_for(what, timeout: float = 120, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := what():
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_ray_worker_is_retried_and_a_killed_stage_commits_nothing_and_resumes(ray_cluster, curated_corpus,
                                                                                       tmp_path):
    """filter on the cluster, over the curated corpus's WARCs: (1) a Ray worker killed in the
    middle of a datatrove task: Ray runs the task again and the stage commits the local
    executor's files; (2) the stage's own process killed: nothing is committed, its Ray tasks
    end, and the rerun skips the tasks that finished and commits the same documents."""
    ns, address = ray_cluster["ns"], ray_cluster["address"]
    src, reference, lake = lake_with_curated_download(curated_corpus, tmp_path)
    script = tmp_path / "filter_on_ray.py"
    script.write_text(FILTER)

    def start(extra: dict) -> subprocess.Popen:
        return ns.popen(sys.executable, str(script), str(lake), address, json.dumps(extra))

    # (1) a worker killed mid-task
    proc = start(reference.params)
    victim = wait_for(ray_task_pids)[0]
    os.kill(victim, signal.SIGKILL)
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-4000:]
    result = json.loads(text.split("RESULT ", 1)[1])
    assert result["ref"] == reference.ref
    assert (result["ref"], result["files"]) == files_of(reference)

    # (2) the stage killed once its first task is done (another version: 8 tasks, a file each)
    lake_ = Lake(str(lake))
    again = {**reference.params, "tasks": 8}
    proc = start(again)
    completions = lambda: [p for p in lake_.files_under(lake_.path("filter")) if "/completions/" in p]  # noqa: E731
    wait_for(completions)
    os.kill(proc.pid, signal.SIGKILL)  # `ip netns exec` execs: this is the stage's process
    proc.wait(30)
    [version] = [v for v in lake_._version_dirs("filter") if f"filter@{v}" != reference.ref]
    assert lake_.manifest("filter", version) is None  # nothing committed
    finished = len(completions())
    assert 1 <= finished < 8
    wait_for(lambda: not ray_task_pids(), timeout=60)  # Ray ended the dead driver's tasks
    proc = start(again)
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-4000:]
    assert f"Skipping {finished} already completed tasks" in text, text[-3000:]
    result = json.loads(text.split("RESULT ", 1)[1])
    assert result["ref"] == f"filter@{version}"
    assert documents(lake_, lake_.resolve(result["ref"])) == documents(src, reference)


def test_ray_parameters_are_checked_before_any_work(tmp_path, monkeypatch):
    """executor 'ray' needs a cluster; a head that does not answer, and local files a remote
    worker cannot read, are one line each, and nothing is committed."""
    from pydantic import ValidationError

    from tasks.download import DownloadParams, download
    from tasks.errors import BadInput
    from tasks.filter import FilterParams

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValidationError, match="executor 'ray' needs a cluster: set \\$RAY_ADDRESS or ray_address"):
        FilterParams(executor="ray")
    with pytest.raises(ValidationError, match="ray_address is for executor 'ray'"):
        FilterParams(ray_address="127.0.0.1:6379")
    warc = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "warc" / "wget-sample-0000.warc.gz")
    with pytest.raises(ValidationError, match="files are on this machine"):
        DownloadParams(files=[warc], executor="ray", ray_address="127.0.0.1:6379")
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(BadInput, match=r"invalid ray_address '127\.0\.0\.1:9': no Ray head answers there"):
        download(lake, DownloadParams(urls=["file://" + warc], executor="ray", ray_address="127.0.0.1:9"))
    assert not lake.versions("download")
    r = subprocess.run([str(BIN / "crawl2model"), "--lake", str(tmp_path / "lake"), "stage", "download",
                        "--urls", "file://" + warc, "--executor", "ray"], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "needs a cluster" in r.stderr


def test_a_node_that_cannot_see_a_local_lake_is_refused_by_name(tmp_path):
    """A one-node cluster whose node has its own view of the disk (a mount namespace with an
    empty folder over the lake's): the stage refuses it, naming the node, before any work."""
    lake = tmp_path / "shared-folder" / "lake"
    lake.mkdir(parents=True)
    ns = Namespace("blind")
    temp = Path(f"/tmp/c2m-ray-{uuid.uuid4().hex[:6]}")
    try:
        hide = ("unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs blind "{lake.parent}" && exec "$0" "$@"')
        address = start_ray(ns, temp, head_cpus=1, more_nodes=[], wrap=hide)
        script = tmp_path / "download_on_ray.py"
        script.write_text(textwrap.dedent("""
            import sys
            from tasks.download import DownloadParams, download
            from tasks.errors import BadInput
            from tasks.lake import Lake

            if __name__ == "__main__":
                try:
                    download(Lake(sys.argv[1]), DownloadParams(urls=["file://" + sys.argv[2]], executor="ray",
                                                               ray_address=sys.argv[3]))
                except BadInput as e:
                    print("REFUSED", e)
        """))
        warc = Path(__file__).resolve().parents[2] / "shared" / "data" / "warc" / "wget-sample-0000.warc.gz"
        r = ns.run(sys.executable, str(script), str(lake), str(warc), address)
        assert "REFUSED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        line = r.stdout.split("REFUSED ", 1)[1].strip()
        assert re.match(rf"Ray node 127\.0\.0\.1 \(.+, node id [0-9a-f]{{12}}\) cannot see the lake {lake}: "
                        "with executor 'ray' every node works in the lake", line), line
        assert not Lake(str(lake)).versions("download")  # nothing committed
    finally:
        ns.close()
        shutil.rmtree(temp, ignore_errors=True)
