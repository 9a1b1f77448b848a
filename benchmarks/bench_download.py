"""Download + verification over loopback (issue 14): the stage checks each WARC (sha256, every
gzip member to its CRC, every record's length) on the bytes as they arrive, so its wall time is
compared with the larger of the transfer alone (curl) and the check alone done by the standard
tools (`gzip -t` and `sha256sum`, which inflate and hash every byte once), each with the same
4-way parallelism; and the check of files on disk (`verify_warc`, one read) with those tools.
The mirror is served by a process of its own (`served`), for both, as a remote server would be."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import alternating_medians, record
from tasks.download import DownloadParams, download
from tasks.lake import Lake
from tasks.warc import verify_warc
from tests.ccserver import make_cc_layout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "warc"
COPIES = 24  # 24 x the 2.5 MB Heritrix WARC = 60 MB


@contextlib.contextmanager
def served(root: Path):
    """The Common Crawl layout served over loopback by a process of its own, as a remote server
    would be: in this process its threads would take turns with the download's for the GIL,
    while curl's transfer (another process) would have them to itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tests.ccserver", str(root), str(port)],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        if "serving" not in server.stdout.readline():
            raise RuntimeError("the loopback server did not start")
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(10)


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
        with served(work / "cc") as base_url:
            urls = [base_url + r for r in rels]
            counter = iter(range(10**6))

            def ours() -> None:  # a new lake each time: no cache hit
                lake = Lake(str(work / f"lake-{next(counter)}"))
                download(lake, DownloadParams(crawl="CC-MAIN-BENCH", base_url=base_url,
                                              segments=COPIES, concurrency=4))

            def curl() -> None:
                out = work / f"curl-{next(counter)}"
                out.mkdir()
                args = ["curl", "-sSf", "--no-progress-meter", "--parallel", "--parallel-max", "4"]
                for i, u in enumerate(urls):
                    args += ["-o", str(out / f"{i}.warc.gz"), u]
                subprocess.run(args, check=True)

            def tools(parallel: int) -> None:  # gzip -t and sha256sum on every file
                subprocess.run(["xargs", "-P", str(parallel), "-n", "1", "sh", "-c",
                                'gzip -t "$0" && sha256sum "$0" >/dev/null'],
                               input="\n".join(map(str, copies)).encode(), check=True)

            def verify() -> None:
                for p in copies:
                    verify_warc(lambda p=p: open(p, "rb"), p.name)

            t = alternating_medians({"ours": ours, "curl": curl, "tools4": lambda: tools(4),
                                     "verify": verify, "tools1": lambda: tools(1)})
        t_ours, t_curl, t_tools4, t_verify, t_tools1 = (t[k] for k in ("ours", "curl", "tools4", "verify", "tools1"))
        limit = max(t_curl, t_tools4)
        record(f"download + verify {COPIES} WARCs ({mib:.0f} MiB) over loopback, 4 parallel: seconds",
               f"{t_ours:.2f} s ({mib / t_ours:.0f} MiB/s, checked as it arrives, committed)",
               f"the larger of curl --parallel {t_curl:.2f} s and gzip -t + sha256sum (4 parallel) {t_tools4:.2f} s",
               t_ours / limit, "make bench")
        record(f"verify {COPIES} WARCs on disk ({mib:.0f} MiB, {COPIES * 822} records), one at a time: seconds",
               f"verify_warc {t_verify:.2f} s ({mib / t_verify:.0f} MiB/s, one read)",
               f"gzip -t + sha256sum {t_tools1:.2f} s", t_verify / t_tools1, "make bench")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
