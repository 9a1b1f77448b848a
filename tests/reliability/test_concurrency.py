"""Concurrency: two identical pipeline runs at once on one S3 lake, and a different run beside
them. Each version has exactly one producer (the other run waits and reuses it), every result
equals the uninterrupted reference run's, and the different run is not disturbed."""

from __future__ import annotations

import re
import subprocess

from tasks.lake import Lake
from tests.conftest import BIN, QUICK, STAGES, copy_version, make_bucket, versions_and_hashes


def summary(stdout: str) -> dict[str, str]:
    """{stage: "built now" | "cache hit"} from the run's summary table."""
    return {m[1]: m[2] for m in re.finditer(r"│ (\w+)\s+│ \w+@[0-9a-f]{16}\s+│ (built now|cache hit)", stdout)}


def start(lake: str, cwd, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "crawl2model"), "--lake", lake, "run", "--preset", "demo", *QUICK, *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_identical_runs_share_one_producer_and_a_different_run_is_undisturbed(demo_local_run, demo_mirror,
                                                                               s3_endpoint, tmp_path):
    lake_url = f"s3://{make_bucket(s3_endpoint)}/lake"
    other = ["--to", "shard", "--set", "tokenizer.vocab_size=768"]
    runs = [start(lake_url, demo_mirror.parent), start(lake_url, demo_mirror.parent),
            start(lake_url, demo_mirror.parent, *other)]
    outs = [p.communicate(timeout=1200) for p in runs]
    for p, (_, err) in zip(runs, outs):
        assert p.returncode == 0, err[-3000:]

    lake, reference = Lake(lake_url), Lake(demo_local_run[0])
    for stage, (version, files) in versions_and_hashes(reference).items():  # `latest` moves: by version
        m = lake.manifest(stage, version)
        assert m is not None and {f["path"]: f["sha256"] for f in m.files} == files, stage
    a, b, c = (summary(out) for out, _ in outs)
    assert set(a) == set(b) == set(STAGES) and set(c) == set(STAGES[:5]), (a, b, c)
    for stage in STAGES:  # one producer per version: the others waited and reused it
        sharing = [a, b, c] if stage in c and stage not in ("tokenizer", "shard") else [a, b]
        assert [x[stage] for x in sharing].count("built now") == 1, (stage, a, b, c)
    # the different run's own versions equal those of a run made alone
    assert c["tokenizer"] == c["shard"] == "built now", c
    assert [len(lake.versions(k)) for k in STAGES] == [1, 1, 1, 2, 2, 1]
    alone = Lake(str(tmp_path / "alone"))
    copy_version(reference, alone, reference.resolve("dedup").ref)
    r = subprocess.run([str(BIN / "crawl2model"), "--lake", alone.url, "run", "--preset", "demo", *QUICK,
                        "--from", "tokenizer", *other], cwd=demo_mirror.parent, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for kind in ("tokenizer", "shard"):
        solo = alone.resolve(kind)
        beside = lake.manifest(kind, solo.version)
        assert beside is not None and beside.files == solo.files, kind
        assert solo.version != reference.resolve(kind).version
    assert all(lake.verify(m) == [] for kind in STAGES for m in lake.versions(kind))
