"""`crawl2model demo`: the pipeline on the embedded defaults, offline (local lake, Prefect's
ephemeral server), on the demo mirror that stands in for Common Crawl. It grows with the
stages; today it runs the stages that exist."""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table

from flows.download import download
from tasks.download import DownloadParams
from tasks.lake import Lake
from tasks.mirror import DEMO_CRAWL, build_mirror


def demo(lake_url: str, mirror_dir: str = "demo-mirror") -> None:
    console = Console()
    if not os.path.exists(os.path.join(mirror_dir, "collinfo.json")):
        build_mirror(mirror_dir)
    base_url = "file://" + os.path.abspath(mirror_dir) + "/"
    rows = []
    t = time.time()
    ref = download(DownloadParams(crawl=DEMO_CRAWL, base_url=base_url, segments=4), lake_url=lake_url)
    m = Lake(lake_url).resolve(ref)
    rows.append(("download", m.ref, f"{time.time() - t:.1f}s",
                 f"{m.metrics['files']} WARC files, {m.metrics['records']} records "
                 f"({m.metrics['records_by_type'].get('response', 0)} responses)"))
    table = Table(title=f"crawl2model demo (lake {lake_url}; the demo mirror stands in for Common Crawl)")
    for col in ("stage", "version", "time", "numbers"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
