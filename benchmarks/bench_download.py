"""Download throughput over loopback against plain curl of the same files, and what
verification (every gzip member + every record) costs on top of the transfer."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import median_seconds, record
from tasks.download import DownloadParams, download
from tasks.lake import Lake
from tasks.warc import verify_warc
from tests.ccserver import CCServer, make_cc_layout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "warc"
COPIES = 24  # 24 x the 2.5 MB Heritrix WARC = 60 MB


def run() -> None:
    work = Path(tempfile.mkdtemp(prefix="c2m-bench-dl-"))
    try:
        src = SHARED / "ia-2008-heritrix.warc.gz"
        copies = []
        for i in range(COPIES):
            p = work / "src" / f"copy-{i:02d}.warc.gz"
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, p)
            copies.append(p)
        rels = make_cc_layout(work / "cc", copies, crawl="CC-MAIN-BENCH")
        mib = COPIES * src.stat().st_size / 2**20
        with CCServer(work / "cc") as srv:
            urls = [srv.url + r for r in rels]
            counter = iter(range(10**6))

            def ours() -> None:  # a new lake each time: no cache hit
                lake = Lake(str(work / f"lake-{next(counter)}"))
                download(lake, DownloadParams(crawl="CC-MAIN-BENCH", base_url=srv.url,
                                              segments=COPIES, concurrency=4))

            def curl() -> None:
                out = work / f"curl-{next(counter)}"
                out.mkdir()
                args = ["curl", "-sSf", "--no-progress-meter", "--parallel", "--parallel-max", "4"]
                for i, u in enumerate(urls):
                    args += ["-o", str(out / f"{i}.warc.gz"), u]
                subprocess.run(args, check=True)

            t_ours, t_curl = median_seconds(ours), median_seconds(curl)
        t_verify = median_seconds(lambda: [verify_warc(lambda p=p: open(p, "rb"), p.name) for p in copies])
        record(f"download {COPIES} WARCs ({mib:.0f} MiB) over loopback, 4 parallel: seconds",
               f"{t_ours:.2f} s ({mib / t_ours:.0f} MiB/s, incl. verify + commit)",
               f"curl --parallel {t_curl:.2f} s ({mib / t_curl:.0f} MiB/s)", t_ours / t_curl, "make bench")
        record(f"verify {COPIES} WARCs ({mib:.0f} MiB, {COPIES * 822} records): seconds",
               f"{t_verify:.2f} s ({mib / t_verify:.0f} MiB/s)", f"curl transfer {t_curl:.2f} s",
               t_verify / t_curl, "make bench")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
