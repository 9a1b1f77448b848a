"""`crawl2model demo`: the pipeline on the embedded defaults, offline (local lake, Prefect's
ephemeral server), on the demo mirror that stands in for Common Crawl. It grows with the
stages; today it runs the stages that exist."""

from __future__ import annotations

import os
import time

from prefect import flow
from rich.console import Console
from rich.table import Table

from flows.dedup import dedup
from flows.download import download
from flows.filter import filter as filter_flow
from tasks.dedup import DedupParams
from tasks.download import DownloadParams
from tasks.filter import FilterParams
from tasks.lake import Lake
from tasks.mirror import DEMO_CRAWL, build_mirror


@flow(name="demo", log_prints=True)
def demo_flow(lake_url: str, base_url: str) -> list[tuple[str, str, float]]:
    runs = []
    t = time.time()
    ref = download(DownloadParams(crawl=DEMO_CRAWL, base_url=base_url, segments=4), lake_url=lake_url)
    runs.append(("download", ref, time.time() - t))
    t = time.time()
    ref = filter_flow(FilterParams(input=ref), lake_url=lake_url)
    runs.append(("filter", ref, time.time() - t))
    t = time.time()
    ref = dedup(DedupParams(input=ref), lake_url=lake_url)
    runs.append(("dedup", ref, time.time() - t))
    return runs


def numbers(kind: str, metrics: dict) -> str:
    if kind == "download":
        return (f"{metrics['files']} WARC files, {metrics['records']} records "
                f"({metrics['records_by_type'].get('response', 0)} responses)")
    if kind == "filter":
        first = metrics["funnel"][0]["docs_in"]
        return f"{first} HTML pages -> {metrics['documents']} documents ({metrics['bytes']:,} bytes)"
    if kind == "dedup":
        return (f"{metrics['input_documents']} -> {metrics['documents']} documents "
                f"({metrics['exact_removed']} exact, {metrics['minhash_removed']} near duplicates)")
    return ""


def demo(lake_url: str, mirror_dir: str = "demo-mirror") -> None:
    if not os.path.exists(os.path.join(mirror_dir, "collinfo.json")):
        build_mirror(mirror_dir)
    runs = demo_flow(lake_url, "file://" + os.path.abspath(mirror_dir) + "/")
    lake = Lake(lake_url)
    table = Table(title=f"crawl2model demo (lake {lake_url}; the demo mirror stands in for Common Crawl)")
    for col in ("stage", "version", "time", "numbers"):
        table.add_column(col)
    for kind, ref, seconds in runs:
        table.add_row(kind, ref, f"{seconds:.1f}s", numbers(kind, lake.resolve(ref).metrics))
    Console().print(table)
