"""The lake contract (DESIGN §2). Every test here runs twice: on a local folder and on a real
S3 API (moto_server on loopback, bucket versioning on), through the same code path."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from tasks.lake import Lake, LakeError, version_of
from tests.conftest import ROOT, S3_KEY_ID, S3_SECRET, make_bucket, run_cli, run_cli_all

WRITER = [sys.executable, str(ROOT / "tests" / "lake_writer.py")]


def produce(lake: Lake, kind: str, params: dict, inputs=(), files: dict | None = None):
    files = files if files is not None else {"data.txt": f"{kind} {params}".encode()}
    with lake.produce(kind, params, list(inputs), "test/1") as p:
        if not p.cached:
            for name, data in files.items():
                p.write_bytes(name, data)
            p.metrics["files"] = len(files)
    return p.manifest


# --------------------------------------------------------------------------- round trip


def test_round_trip_with_sha256(lake_url):
    lake = Lake(lake_url)
    payload = {"a.txt": b"hello lake\n", "sub/b.bin": os.urandom(300_000), "empty.txt": b""}
    with lake.produce("demo", {"x": 1}, [], "test/1") as p:
        assert not p.cached
        for name, data in payload.items():
            p.write_bytes(name, data)
        # a file written by another tool straight to the version folder (as datatrove does)
        with lake.fs.open(p.path("other.txt"), "wb") as f:
            f.write(b"written around the lake")
        # work in progress is not part of the artifact
        with lake.fs.open(p.path("_work/marker"), "wb") as f:
            f.write(b"1")
        p.metrics["documents"] = 3
    m = lake.resolve("demo")
    assert m.version == p.version == version_of("demo", {"x": 1}, [], "test/1")
    payload["other.txt"] = b"written around the lake"
    assert {f["path"]: (f["bytes"], f["sha256"]) for f in m.files} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in payload.items()}
    for name, data in payload.items():
        with lake.open("demo", name) as f:
            assert f.read() == data
    assert m.metrics["documents"] == 3
    assert lake.verify(m) == []
    # the manifest has exactly the contract's fields
    with lake.fs.open(lake.path("demo", m.version, "_MANIFEST.json")) as f:
        assert set(json.load(f)) == {"kind", "version", "params", "inputs", "files", "metrics",
                                     "created_at", "flow_run_id", "code_version"}
    # a second produce of the same recipe is a cache hit and writes nothing
    with lake.produce("demo", {"x": 1}, [], "test/1") as again:
        assert again.cached and again.manifest.created_at == m.created_at


def test_verify_catches_a_changed_file(lake_url):
    lake = Lake(lake_url)
    m = produce(lake, "demo", {"x": 2})
    with lake.fs.open(lake.path("demo", m.version, "data.txt"), "wb") as f:
        f.write(b"tampered")
    assert lake.verify(m) == ["data.txt"]
    r = run_cli("--lake", lake_url, "artifacts", "verify", m.ref)
    assert r.returncode == 1 and "data.txt" in r.stderr


def test_version_is_a_content_address_independent_of_the_lake(tmp_path, lake_url):
    # Golden value: changing the canonical form would silently rebuild every user's lake.
    assert version_of("filter", {"b": 1, "a": [1, 2]}, ["download@0123456789abcdef"], "f/1") \
        == "05703cb25ccd5276"
    assert version_of("filter", {"a": [1, 2], "b": 1}, ["download@0123456789abcdef"], "f/1") \
        == "05703cb25ccd5276"
    assert version_of("filter", {"a": [1, 2], "b": 2}, ["download@0123456789abcdef"], "f/1") \
        != "05703cb25ccd5276"
    other = Lake(str(tmp_path / "elsewhere"))
    assert produce(Lake(lake_url), "demo", {"k": "v"}).version == produce(other, "demo", {"k": "v"}).version


# --------------------------------------------------------------------------- atomic commit


def test_failed_writer_commits_nothing(lake_url):
    lake = Lake(lake_url)
    with pytest.raises(RuntimeError):
        with lake.produce("demo", {"x": 3}, [], "test/1") as p:
            p.write_bytes("half.txt", b"half")
            raise RuntimeError("boom")
    with pytest.raises(LakeError, match="unknown"):
        lake.resolve(f"demo@{p.version}")
    assert lake.versions("demo") == []
    # the rerun takes over (the lease was released) and commits
    m = produce(lake, "demo", {"x": 3})
    assert m.version == p.version and lake.verify(m) == []


def test_sigkill_never_leaves_a_committed_partial_version(lake_url):
    lake = Lake(lake_url)
    rng = random.Random(7)
    version = None
    for attempt in range(3):
        proc = subprocess.Popen(WRITER + [lake_url, "killed", "k", "12", "0.05"],
                                stdout=subprocess.PIPE, text=True)
        # kill it after a random number of written files (0..10)
        target = rng.randint(0, 10)
        for line in proc.stdout:
            if line.startswith("leased"):
                version = line.split()[1]
            if line.startswith("wrote") and int(line.split()[1]) >= target:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # nothing is committed, and readers do not see the partial version
        assert lake.manifest("killed", version) is None
        assert [m.version for m in lake.versions("killed")] == []
        with pytest.raises(LakeError, match="unknown"):
            lake.resolve("killed")
    # the rerun takes the dead writer's lease over at once (same host, pid gone) and commits
    done = subprocess.run(WRITER + [lake_url, "killed", "k", "12", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout and f"built {version}" in done.stdout
    m = lake.resolve("killed")
    assert len(m.files) == 12 and lake.verify(m) == []


def test_two_processes_racing_for_one_version(lake_url):
    lake = Lake(lake_url)
    procs = [subprocess.Popen(WRITER + [lake_url, "race", "same", "6", "0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    last = [o[0].strip().splitlines()[-1].split() for o in outs]
    assert sorted(word for word, _ in last) == ["built", "cached"], outs
    assert last[0][1] == last[1][1]
    m = lake.resolve("race")
    winner = procs[[word for word, _ in last].index("built")].pid
    assert m.metrics["producer_pid"] == winner
    assert len(m.files) == 6 and lake.verify(m) == []


def test_stale_lease_of_another_host_is_taken_over_and_live_one_is_waited_for(lake_url):
    lake = Lake(lake_url)
    recipe = ("demo", {"lease": 1}, [], "test/1")
    p = lake.produce(*recipe)
    lease = p.dir + "/_lease/00000001.json"
    # a live lease held on another machine: we wait, then give up with a clear error
    lake._create_exclusive(lease, {"host": "other-host", "pid": 1, "expires_at": time.time() + 60})
    waiter = lake.produce(*recipe, wait_timeout=1.0)
    with pytest.raises(LakeError, match="timed out waiting for demo@.*other-host"):
        waiter.__enter__()
    # expired: taken over with the next generation
    lake._write_json_atomic(lease, {"host": "other-host", "pid": 1, "expires_at": time.time() - 1})
    with lake.produce(*recipe) as q:
        assert q.resumed and q._gen == 2
        q.write_bytes("x", b"x")
    assert lake.resolve("demo").version == q.version


def test_a_producer_that_lost_its_lease_does_not_commit(lake_url):
    lake = Lake(lake_url)
    with pytest.raises(LakeError, match="lost the lease"):
        with lake.produce("demo", {"lost": 1}, [], "test/1") as p:
            p.write_bytes("x", b"x")
            # another producer declared us dead and took generation 2
            lake._create_exclusive(p.dir + "/_lease/00000002.json",
                                   {"host": "h", "pid": 1, "expires_at": time.time() + 60})
    assert lake.manifest("demo", p.version) is None


# --------------------------------------------------------------------------- aliases, lineage


def test_aliases_move(lake_url):
    lake = Lake(lake_url)
    v1 = produce(lake, "demo", {"n": 1})
    assert lake.resolve("demo").version == v1.version
    v2 = produce(lake, "demo", {"n": 2})
    assert lake.resolve("demo@latest").version == v2.version
    lake.tag(v1.ref, "golden")
    assert lake.resolve("demo@golden").version == v1.version
    lake.tag(v2.ref, "golden")
    assert lake.resolve("demo@golden").version == v2.version
    assert lake.aliases("demo") == {"latest": v2.version, "golden": v2.version}
    # a cache hit on v1 is what the user asked for now: latest follows it
    produce(lake, "demo", {"n": 1})
    assert lake.resolve("demo").version == v1.version
    assert [m.version for m in lake.versions("demo")] == [v1.version, v2.version]


def test_lineage_walk(lake_url):
    lake = Lake(lake_url)
    a = produce(lake, "download", {"crawl": "X"})
    b = produce(lake, "filter", {"t": 0.5}, [a.ref])
    c = produce(lake, "tokenizer", {"vocab": 512}, [b.ref])
    d = produce(lake, "shard", {"val": 0.1}, ["filter", "tokenizer"])  # refs resolve to versions
    assert d.inputs == [b.ref, c.ref]
    assert lake.lineage(d.ref) == {
        "ref": d.ref, "created_at": d.created_at, "inputs": [
            {"ref": b.ref, "created_at": b.created_at, "inputs": [
                {"ref": a.ref, "created_at": a.created_at, "inputs": []}]},
            {"ref": c.ref, "created_at": c.created_at, "inputs": [
                {"ref": b.ref, "created_at": b.created_at, "inputs": [
                    {"ref": a.ref, "created_at": a.created_at, "inputs": []}]}]}]}
    # the version depends on the input's version: a new upstream means a new downstream
    a2 = produce(lake, "download", {"crawl": "Y"})
    b2 = produce(lake, "filter", {"t": 0.5}, [a2.ref])
    assert b2.version != b.version
    r = run_cli("--lake", lake_url, "artifacts", "lineage", d.ref, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inputs"][0]["inputs"][0]["ref"] == a.ref


# --------------------------------------------------------------------------- gc


def test_gc_deletes_leftovers_and_unreachable_versions_only(lake_url):
    lake = Lake(lake_url)
    old_dl = produce(lake, "download", {"crawl": "old"})
    kept_by_tag = produce(lake, "download", {"crawl": "tagged"})
    lake.tag(kept_by_tag.ref, "v1")
    dl = produce(lake, "download", {"crawl": "new"})
    flt = produce(lake, "filter", {"t": 1}, [dl.ref])
    lake.tag(flt.ref, "release")
    flt_latest = produce(lake, "filter", {"t": 2}, [kept_by_tag.ref])
    # dl is reachable only through lineage of filter@release; kept_by_tag by its tag
    # and as the input of filter@latest. old_dl is reachable from nothing.
    # An uncommitted leftover of a dead writer:
    with pytest.raises(RuntimeError):
        with lake.produce("filter", {"t": 3}, [], "test/1") as dead:
            dead.write_bytes("partial.bin", b"x" * 1000)
            raise RuntimeError("killed")
    assert lake.files_under(dead.dir)

    dry = lake.gc(dry_run=True)
    assert dry["unreachable"] == [old_dl.ref]
    assert dry["uncommitted"] == [dead.ref]
    assert lake.exists("download", old_dl.version) and lake.files_under(dead.dir)  # untouched

    r = run_cli("--lake", lake_url, "artifacts", "gc", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["unreachable"] == [old_dl.ref]
    assert not lake.exists("download", old_dl.version)
    assert lake.files_under(dead.dir) == []
    for m in (kept_by_tag, dl, flt, flt_latest):
        assert lake.verify(m.ref) == []
    assert lake.gc() == {"uncommitted": [], "unreachable": [], "temporary": []}


def test_gc_keeps_a_version_being_produced(lake_url):
    lake = Lake(lake_url)
    with lake.produce("demo", {"live": 1}, [], "test/1") as p:
        p.write_bytes("x", b"x")
        assert lake.gc()["uncommitted"] == []
        assert lake.fs.exists(p.path("x"))
    assert lake.verify("demo") == []


# --------------------------------------------------------------------------- CLI and errors


def test_cli_ls_show_tag(lake_url):
    lake = Lake(lake_url)
    a = produce(lake, "download", {"crawl": "X"})
    b = produce(lake, "filter", {"t": 0.5}, [a.ref])
    r = run_cli("--lake", lake_url, "artifacts", "ls", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["ref"], x["aliases"]) for x in rows] == [(a.ref, ["latest"]), (b.ref, ["latest"])]
    r = run_cli("--lake", lake_url, "artifacts", "show", "filter", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == b.to_json()
    r = run_cli("--lake", lake_url, "artifacts", "tag", a.ref, "stable")
    assert r.returncode == 0 and lake.resolve("download@stable").version == a.version
    r = run_cli("--lake", lake_url, "artifacts", "ls")  # the rich table for people
    assert r.returncode == 0 and a.version in r.stdout and "stable" in r.stdout
    r = run_cli("--lake", lake_url, "artifacts", "show", b.ref)
    assert r.returncode == 0 and "data.txt" in r.stdout and a.ref in r.stdout


@pytest.mark.parametrize("args, message", [
    (["artifacts", "show", "filter@@x"], "malformed ref 'filter@@x'"),
    (["artifacts", "show", "Filter"], "invalid artifact kind 'Filter'"),
    (["artifacts", "show", "nosuchkind"], "unknown artifact kind 'nosuchkind'"),
    (["artifacts", "show", "demo@0123456789abcdef"], "unknown version demo@0123456789abcdef"),
    (["artifacts", "show", "demo@nosuchalias"], "unknown alias demo@nosuchalias"),
    (["artifacts", "show", "demo@"], "nothing after '@'"),
    (["artifacts", "tag", "demo", "a/b"], "invalid alias 'a/b'"),
    (["artifacts", "tag", "demo", "../../etc"], "invalid alias '../../etc'"),
    (["artifacts", "tag", "demo", "/etc/passwd"], "invalid alias '/etc/passwd'"),
    (["artifacts", "tag", "demo", "x..y"], "invalid alias 'x..y'"),
    (["artifacts", "show", "../demo"], "invalid artifact kind '../demo'"),
    (["artifacts", "frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_cli_errors_are_one_line_exit_2(lake_url, args, message):
    produce(Lake(lake_url), "demo", {"n": 1})
    r = run_cli("--lake", lake_url, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_unreadable_manifest_is_a_clear_error(lake_url):
    lake = Lake(lake_url)
    m = produce(lake, "demo", {"n": 1})
    with lake.fs.open(lake.path("demo", m.version, "_MANIFEST.json"), "wb") as f:
        f.write(b"{not json")
    r = run_cli("--lake", lake_url, "artifacts", "show", m.ref)
    assert r.returncode == 2 and "unreadable manifest" in r.stderr and m.version in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unreachable_lake_is_a_clear_error(tmp_path, lake_url):
    if lake_url.startswith("s3://"):
        missing = "s3://c2m-no-such-bucket-here/lake"
        r = run_cli("--lake", missing, "artifacts", "ls")
        assert r.returncode == 2 and "bucket 'c2m-no-such-bucket-here' does not exist" in r.stderr
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        r = run_cli("--lake", lake_url, "--s3-endpoint", dead, "artifacts", "ls",
                    env={"AWS_MAX_ATTEMPTS": "1"})
        assert r.returncode == 2 and f"cannot reach lake {lake_url}" in r.stderr
    else:
        r = run_cli("--lake", str(tmp_path / "nowhere"), "artifacts", "ls")
        assert r.returncode == 2 and "does not exist" in r.stderr
        (tmp_path / "afile").write_text("x")
        r = run_cli("--lake", str(tmp_path / "afile"), "artifacts", "ls")
        assert r.returncode == 2 and "is not a directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_no_credential_in_any_manifest_or_log(s3_endpoint, caplog):
    # Only the S3 lake has credentials; they come from the environment.
    lake_url = f"s3://{make_bucket(s3_endpoint)}/lake"
    lake = Lake(lake_url)
    caplog.set_level("INFO")  # the level the project logs at (botocore DEBUG echoes key ids)
    a = produce(lake, "download", {"crawl": "X"})
    produce(lake, "filter", {"t": 1}, [a.ref])
    logs = []
    for r in run_cli_all(*(["--lake", lake_url, *args] for args in (
            ["artifacts", "ls"], ["artifacts", "show", "filter", "--json"], ["artifacts", "lineage", "filter"],
            ["artifacts", "gc", "--dry-run"], ["artifacts", "show", "nosuch"]))):
        logs += [r.stdout, r.stderr]
    written = b"".join(lake.fs.cat_file(p) for p in lake.fs.find(lake.root))
    for secret in (S3_SECRET, S3_KEY_ID):
        assert secret.encode() not in written
        assert all(secret not in log for log in logs + [caplog.text])
