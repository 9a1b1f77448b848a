"""docs/SCALING.md's `plan` figures for CC-MAIN-2025-47, offline: `python -m benchmarks.plan_figures`.

Lays out a mirror of the real listing (../shared/data/cc-listings, 100,000 WARC paths) with a real
Common Crawl WARC excerpt under the path `plan` samples (a stand-in for a whole file, so the command
states a file's size and pages), measures two runs of the benchmark crawl (1 and 2 of its 4 files,
bench_scale.py's real pages) on a warm cache, then prints the plan."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_scale import bench_mirror, sample_runs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LISTED = "CC-MAIN-2025-47"
ARGS = ["--bytes-per-file", "1000000000", "--pages-per-file", "27500", "--workers", "512", "--gpus", "64",
        "--usd-per-cpu-hour", "0.05", "--usd-per-gpu-hour", "2.5", "--usd-per-tb-month", "20"]


def main() -> None:
    from tasks.download import select_spread
    from tasks.lake import Lake
    from tasks.steps import compact_blocklist

    work = Path(tempfile.mkdtemp(prefix="c2m-plan-figures-"))
    os.environ.setdefault("CRAWL2MODEL_CACHE", str(work / "cache"))
    try:
        compact_blocklist()  # a one-off of the first run on a machine: not a cost per page
        mirror = bench_mirror(work)
        lake = sample_runs(Lake(str(work / "measured")), mirror)
        cc = work / "cc-mirror"
        listing = cc / "crawl-data" / LISTED / "warc.paths.gz"
        listing.parent.mkdir(parents=True)
        shutil.copyfile(SHARED / "cc-listings" / LISTED / "warc.paths.gz", listing)
        paths = [p for p in gzip.decompress(listing.read_bytes()).decode().split() if p]
        sampled = select_spread(paths, 1, seed=0)[0]
        (cc / sampled).parent.mkdir(parents=True)
        shutil.copyfile(SHARED / "warc" / "cc-main-2020-34-excerpt.warc.gz", cc / sampled)
        print(f"stand-in for {sampled}: ../shared/data/warc/cc-main-2020-34-excerpt.warc.gz", flush=True)
        subprocess.run([str(Path(sys.executable).parent / "crawl2model"), "--lake", lake.url, "plan", "--crawl", LISTED,
                        "--base-url", f"file://{cc}/", *ARGS], check=True, env={**os.environ, "COLUMNS": "200"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
