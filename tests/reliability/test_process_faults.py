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

from tasks.lake import Lake
from tests.conftest import BIN, QUICK, STAGES, copy_version

SEED = int(os.environ.get("C2M_KILL_SEED", random.randrange(1 << 16)))


def stage_seconds(log: str) -> dict[str, float]:
    """Each stage's duration in the reference run, from the pipeline's own log lines."""
    return {m[1]: float(m[2]) for m in re.finditer(r" - (\w+) -> \w+@[0-9a-f]{16} \(([\d.]+)s\)", log)}


def orphans(lake_dir: Path) -> list[str]:
    """Processes still working on this lake (their command line names it)."""
    r = subprocess.run(["pgrep", "-af", str(lake_dir)], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_a_random_point_then_rerun_equals_an_uninterrupted_run(stage, demo_local_run, demo_mirror,
                                                                          tmp_path):
    ref_url, ref_run = demo_local_run
    reference = Lake(ref_url).resolve(stage)
    took = stage_seconds(ref_run.stderr + ref_run.stdout)
    assert stage in took, "the reference run logs each stage's duration"
    rng = random.Random(f"{SEED}-{stage}")
    delay = rng.uniform(0.05, 0.95) * took[stage]
    why = f"(C2M_KILL_SEED={SEED}: killed {delay:.1f}s after its lease appeared)"

    lake_dir = tmp_path / "lake"
    lake = Lake(str(lake_dir))
    for upstream in reference.inputs:  # the same inputs, by value: the same version is produced
        copy_version(Lake(ref_url), lake, upstream)
    cmd = [str(BIN / "crawl2model"), "--lake", str(lake_dir), "run", "--preset", "demo", *QUICK,
           "--from", stage, "--to", stage]
    proc = subprocess.Popen(cmd, cwd=demo_mirror.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: torchrun and datatrove workers die too
    lease = lake_dir / stage / reference.version / "_lease"
    deadline = time.time() + 300
    while not lease.exists():
        assert proc.poll() is None and time.time() < deadline, f"{stage} never started producing {why}"
        time.sleep(0.05)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its group (datatrove's workers)
    proc.wait()
    # torchrun runs in a session of its own: it and its workers must die with the stage
    deadline = time.time() + 10
    while (left := orphans(lake_dir)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the killed stage: {left} {why}"

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
