"""Storage faults: a fault-injecting proxy (tests/s3faults.py) between every stage and the S3
API server. Transient faults (500, 503 SlowDown, resets, lost replies, cut bodies, stalls) are
retried and the pipeline's versions and file hashes equal a clean run's; an outage in the middle
of a stage is a clear error with nothing committed, and the rerun completes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import boto3
import pytest

from tasks.lake import SECRET_BLOCK_ENV, Lake
from tasks.stage import cache_dir
from tests.conftest import (BIN, S3_KEY_ID, S3_SECRET, TEST_HOME, copy_version, faults, make_bucket,
                            versions_and_hashes)
from tests.reliability.conftest import summary_refs
from tests.s3faults import KINDS


def test_the_lake_commits_through_every_fault_kind(s3_endpoint, fault_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy)
    lake = Lake(f"s3://{make_bucket(s3_endpoint)}/lake")
    payload = {"small.bin": os.urandom(100_000), "large.bin": os.urandom(6_000_000)}  # large: multipart

    def produce(i: int):
        with lake.produce("thing", {"i": i}, [], "1", wait_timeout=120) as p:
            for name, data in payload.items():
                p.write_bytes(name, data)
        return p.manifest

    # Every request's first reply is lost although S3 did the work: the retried conditional PUT
    # of the lease then gets 412 (it exists: ours). This used to wait for itself forever.
    with faults(fault_proxy, rate=1.0, kinds=["lost-reply"]) as counts:
        m = produce(0)
        assert counts()["lost-reply"] > 20
    with faults(fault_proxy, rate=0.3, seed=3) as counts:
        ms = [produce(i) for i in range(1, 5)]
        seen = counts()
    assert set(KINDS) <= set(seen), seen  # every kind of fault was injected
    for m in [m, *ms]:
        assert lake.verify(m) == [] and lake.resolve(m.ref).files == m.files
        with lake.open(m, "large.bin") as f:
            assert f.read() == payload["large.bin"]


@pytest.fixture(scope="module")
def faulted_run(s3_pipelines):
    """The demo pipeline on S3, every request through the proxy, 10% of them faulted, the credentials
    from a Prefect Secret block, not from the environment: three runs at once on one lake, made once
    for this module and test_concurrency (tests/reliability/conftest.py). (bucket, runs, faults)."""
    for r in s3_pipelines["runs"]:
        assert r.returncode == 0, r.stderr[-4000:]
    return s3_pipelines["bucket"], s3_pipelines["runs"], s3_pipelines["injected"]


def test_the_pipeline_through_s3_faults_equals_a_clean_local_run(faulted_run, demo_local_run):
    bucket, runs, injected = faulted_run
    assert all(injected.get(k, 0) >= 5 for k in KINDS), injected
    lake, clean = Lake(f"s3://{bucket}/lake"), versions_and_hashes(Lake(demo_local_run[0]))
    for r in runs[:2]:  # the full runs (the third one differs on purpose): by the versions each reports
        got = {stage: lake.resolve(ref) for stage, ref in summary_refs(r.stdout).items()}
        assert {stage: (m.version, {f["path"]: f["sha256"] for f in m.files}) for stage, m in got.items()} == clean


def test_no_credential_in_anything_a_pipeline_run_wrote(faulted_run, s3_endpoint):
    """Everything the S3 run wrote: every object in the bucket, its output and logs, the local
    cache, and Prefect's database (flow parameters, logs, artifacts)."""
    bucket, runs, _ = faulted_run
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    blobs = [out.encode() for r in runs for out in (r.stdout, r.stderr)]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert len(keys) > 50
    blobs += [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys]
    local = [p for root in (cache_dir(), TEST_HOME) for p in Path(root).rglob("*") if p.is_file()]  # the server's too
    assert any(p.name.endswith(".db") for p in local), "Prefect's database was not found"
    blobs += [p.read_bytes() for p in local]
    for secret in (S3_KEY_ID, S3_SECRET):
        hits = [i for i, b in enumerate(blobs) if secret.encode() in b]
        assert not hits, f"{secret[:6]}... found in {len(hits)} written object(s)"


TINY = ["--preset", "tiny", "--nproc-per-node", "2", "--set", "batch_size=8", "--set", "seq_len=128",
        "--set", "eval_every=10", "--set", "sample_every=0", "--set", "checkpoint_every=5"]


@pytest.mark.parametrize("stage", [["dedup", "--set", "seed=7"], ["pretrain", "--max-steps", "40", *TINY]],
                         ids=["dedup", "pretrain"])
def test_an_outage_mid_stage_is_a_clear_error_and_the_rerun_completes(stage, demo_local_run, s3_endpoint,
                                                                       fault_proxy):
    """The stage's inputs are the reference run's, copied into a bucket of the test's own."""
    kind = stage[0]
    bucket = make_bucket(s3_endpoint)
    lake_url = f"s3://{bucket}/lake"
    reference = Lake(demo_local_run[0])
    source = reference.resolve(reference.resolve(kind).inputs[0])  # dedup: the filter; pretrain: the shard
    stage = [*stage, "--input", copy_version(reference, Lake(lake_url), source.ref)]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)  # straight to S3, past the proxy

    def objects() -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"lake/{kind}/")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    before = {k for k in objects() if k.endswith("_MANIFEST.json")}
    cmd = [str(BIN / "crawl2model"), "--lake", lake_url, "stage", *stage]
    env = {**os.environ, "AWS_ENDPOINT_URL": fault_proxy, "AWS_MAX_ATTEMPTS": "2"}  # give up sooner
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not any("/_lease/" in k for k in objects()):  # the stage is producing its version
        assert proc.poll() is None and time.time() < deadline, "the stage never started producing"
        time.sleep(0.2)
    time.sleep(3)
    with faults(fault_proxy, rate=1.0, mode="outage", kinds=["500", "503", "reset"]):
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    line = next(x for x in reversed(err.strip().splitlines()) if x.startswith("error: "))
    assert lake_url in line and "storage error" in line and "rerun" in line, err[-4000:]
    assert {k for k in objects() if k.endswith("_MANIFEST.json")} == before  # nothing committed

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lake = Lake(lake_url)
    m = lake.resolve(kind)
    assert m.ref in r.stdout and lake.verify(m) == []
    assert not [k for k in objects() if f"/{m.version}/_work/" in k or f"/{m.version}/_lease/" in k]


def test_s3_credentials_from_a_prefect_secret_block(prefect_harness, s3_endpoint, monkeypatch):
    from prefect.blocks.system import Secret

    import flows  # noqa: F401  (installs Prefect's runtime: the lake reads Secret blocks through it)
    from tasks.lake import LakeError

    url = f"s3://{make_bucket(s3_endpoint)}/lake"
    Secret(value={"aws_access_key_id": S3_KEY_ID, "aws_secret_access_key": S3_SECRET}).save("c2m-s3", overwrite=True)
    Secret(value="just-a-string").save("c2m-not-s3", overwrite=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv(SECRET_BLOCK_ENV, "c2m-s3")
    with Lake(url).produce("thing", {}, [], "1") as p:
        p.write_bytes("a.txt", b"hello")
    assert Lake(url).verify(p.manifest) == []
    for name, message in [("c2m-nosuch", "cannot load the Prefect Secret block 'c2m-nosuch'"),
                          ("c2m-not-s3", "must hold JSON with aws_access_key_id and aws_secret_access_key")]:
        monkeypatch.setenv(SECRET_BLOCK_ENV, name)
        with pytest.raises(LakeError, match=message):
            Lake(url)
    monkeypatch.delenv(SECRET_BLOCK_ENV)
    with pytest.raises(LakeError, match="cannot reach lake .*credentials"):
        Lake(url).resolve("thing")
