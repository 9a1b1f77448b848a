"""A full disk under a local lake: a small tmpfs holding the lake, with room for the inputs and
little more. The stage fails with a clear error, nothing is committed and the inputs are intact;
once there is room, the rerun completes with the uninterrupted run's version and files."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tasks.lake import Lake
from tests.conftest import BIN, QUICK, copy_version


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted for the test; `resize(kib)` changes its size (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def resize(kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(disk)], check=True)

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# stage -> room left beside its inputs (KiB): less than the stage writes
ROOM = {"download": 64, "filter": 32, "pretrain": 1024}


@pytest.mark.parametrize("stage", list(ROOM))
def test_a_full_disk_is_a_clear_error_and_nothing_is_committed(stage, small_disk, demo_local_run, demo_mirror):
    disk, resize = small_disk
    reference = Lake(demo_local_run[0]).resolve(stage)
    lake = Lake(str(disk / "lake"))
    inputs = [lake.resolve(copy_version(Lake(demo_local_run[0]), lake, i)) for i in reference.inputs]
    used = shutil.disk_usage(disk).used // 1024
    resize(used + ROOM[stage])
    cmd = [str(BIN / "crawl2model"), "--lake", lake.url, "run", "--preset", "demo", *QUICK,
           "--from", stage, "--to", stage]

    r = subprocess.run(cmd, cwd=demo_mirror.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    line = next(x for x in reversed(r.stderr.splitlines()) if x.startswith("error: "))
    assert "No space left on device" in line and "rerun" in line, line
    assert lake.versions(stage) == []
    assert all(lake.verify(m) == [] and lake.resolve(m.ref) == m for m in inputs)  # nothing lost

    resize(64 * 1024)
    r = subprocess.run(cmd, cwd=demo_mirror.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = lake.resolve(stage)
    assert again.version == reference.version and again.files == reference.files
