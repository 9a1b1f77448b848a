"""Concurrency: two identical pipeline runs at once on one S3 lake, and a different run beside
them (made once, through S3 faults, by tests/reliability/conftest.py). Each version has exactly
one producer (the other run waits and reuses it), every result equals the uninterrupted
reference run's, and the different run is not disturbed."""

from __future__ import annotations

import subprocess

from tasks.lake import Lake
from tests.conftest import BIN, QUICK, STAGES, copy_version, versions_and_hashes
from tests.reliability.conftest import OTHER, summary


def test_identical_runs_share_one_producer_and_a_different_run_is_undisturbed(s3_pipelines, demo_local_run,
                                                                               demo_mirror, tmp_path):
    """The runs (tests/reliability/conftest.py: s3_pipelines) went through the S3 fault proxy
    (test_storage_faults asserts on that side of them): faults or not, the results must be these."""
    lake_url = s3_pipelines["lake_url"]
    runs = s3_pipelines["runs"]
    for p in runs:
        assert p.returncode == 0, p.stderr[-3000:]

    lake, reference = Lake(lake_url), Lake(demo_local_run[0])
    for stage, (version, files) in versions_and_hashes(reference).items():  # `latest` moves: by version
        m = lake.manifest(stage, version)
        assert m is not None and {f["path"]: f["sha256"] for f in m.files} == files, stage
    a, b, c = (summary(p.stdout) for p in runs)
    assert set(a) == set(b) == set(STAGES) and set(c) == set(STAGES[:5]), (a, b, c)
    for stage in STAGES:  # one producer per version: the others waited and reused it
        sharing = [a, b, c] if stage in c and stage not in ("tokenizer", "shard") else [a, b]
        assert [x[stage] for x in sharing].count("built now") == 1, (stage, a, b, c)
    # the different run's own versions equal those of a run made alone
    assert c["tokenizer"] == c["shard"] == "built now", c
    assert [s3_pipelines["versions"][k] for k in STAGES] == [1, 1, 1, 2, 2, 1, 1, 1]
    alone = Lake(str(tmp_path / "alone"))
    copy_version(reference, alone, reference.resolve("dedup").ref)
    r = subprocess.run([str(BIN / "crawl2model"), "--lake", alone.url, "run", "--preset", "demo", *QUICK,
                        "--from", "tokenizer", *OTHER], cwd=demo_mirror.parent, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for kind in ("tokenizer", "shard"):
        solo = alone.resolve(kind)
        beside = lake.manifest(kind, solo.version)
        assert beside is not None and beside.files == solo.files, kind
        assert solo.version != reference.resolve(kind).version
    assert all(lake.verify(m) == [] for kind in STAGES for m in lake.versions(kind))
