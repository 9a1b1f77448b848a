"""The S3 pipeline runs that several reliability tests read, made once.

Three demo pipelines at once on one S3 lake, every request through the fault-injecting proxy
with 10% of them faulted, the credentials from a Prefect Secret block only (not in the
environment): two identical runs and a different one beside them. One set of runs serves
- test_concurrency: one producer per version, the different run undisturbed;
- test_storage_faults: the pipeline through S3 faults equals a clean local run, and no credential
  is in anything the runs wrote.
Before, the faulted pipeline and the concurrent ones were separate full pipelines on S3. Under
pytest-xdist the tests that read these runs share one worker (tests/conftest.py groups them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tasks.lake import SECRET_BLOCK_ENV, Lake
from tests.conftest import BIN, QUICK, S3_KEY_ID, S3_SECRET, STAGES, faults, make_bucket

SECRET_BLOCK = "c2m-test-s3"
OTHER = ["--to", "shard", "--set", "tokenizer.vocab_size=768"]  # the different run


def summary(stdout: str) -> dict[str, str]:
    """{stage: "built now" | "cache hit"} from the run's summary table."""
    return {m[1]: m[3] for m in _ROWS.finditer(stdout)}


def summary_refs(stdout: str) -> dict[str, str]:
    """{stage: "kind@version"} from the run's summary table."""
    return {m[1]: m[2] for m in _ROWS.finditer(stdout)}


_ROWS = re.compile(r"│ (\w+)\s+│ (\w+@[0-9a-f]{16})\s+│ (built now|cache hit)")


@pytest.fixture(scope="session")
def s3_pipelines(demo_mirror, s3_endpoint, fault_proxy) -> dict:
    saved = subprocess.run([sys.executable, "-c", "import sys; from prefect.blocks.system import Secret; "
                            "Secret(value={'aws_access_key_id': sys.argv[1], 'aws_secret_access_key': sys.argv[2]})"
                            ".save(sys.argv[3], overwrite=True)", S3_KEY_ID, S3_SECRET, SECRET_BLOCK],
                           capture_output=True, text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr[-2000:]
    bucket = make_bucket(s3_endpoint)
    lake_url = f"s3://{bucket}/lake"
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update({"AWS_ENDPOINT_URL": fault_proxy, SECRET_BLOCK_ENV: SECRET_BLOCK})

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "crawl2model"), "--lake", lake_url, "run", "--preset", "demo", *QUICK,
                                 *extra], cwd=demo_mirror.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)

    with faults(fault_proxy, rate=0.1, seed=1, stall_s=0.1) as counts:  # a stall: 0.1 s, then the reply
        runs = [start(), start(), start(*OTHER)]
        outs = [p.communicate(timeout=1200) for p in runs]
        injected = counts()
    lake = Lake(lake_url)
    return {"bucket": bucket, "lake_url": lake_url, "injected": injected,
            "runs": [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(runs, outs)],
            # what the runs left, before any test adds versions to this lake
            "versions": {k: len(lake.versions(k)) for k in STAGES}}
