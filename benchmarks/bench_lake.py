"""The lake's cost: writing an artifact through `Lake.produce` (hash while writing, manifest,
lease, alias) against a plain fsspec copy of the same bytes to the same disk."""

from __future__ import annotations

import os
import shutil
import tempfile

import fsspec

from benchmarks.common import median_seconds, record
from tasks.lake import Lake

FILES, SIZE = 8, 16 << 20  # 128 MiB in 8 files


def run() -> None:
    payload = os.urandom(SIZE)
    work = tempfile.mkdtemp(prefix="c2m-bench-lake-")
    try:
        counter = iter(range(10**6))

        def through_lake() -> None:
            lake = Lake(os.path.join(work, "lake"))
            with lake.produce("bench", {"run": next(counter)}, [], "bench/1") as p:
                for i in range(FILES):
                    p.write_bytes(f"part-{i}.bin", payload)

        fs = fsspec.filesystem("file", auto_mkdir=True)

        def plain_copy() -> None:
            d = os.path.join(work, "plain", str(next(counter)))
            for i in range(FILES):
                with fs.open(f"{d}/part-{i}.bin", "wb") as f:
                    f.write(payload)

        ours = median_seconds(through_lake)
        peer = median_seconds(plain_copy)
        mib = FILES * SIZE / (1 << 20)
        record("lake commit of 128 MiB (8 files), local disk: seconds",
               f"{ours:.3f} s ({mib / ours:.0f} MiB/s)",
               f"plain fsspec write {peer:.3f} s ({mib / peer:.0f} MiB/s)",
               ours / peer, "make bench")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
