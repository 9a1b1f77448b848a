"""`crawl2model demo`: the pipeline on the embedded defaults, offline (local lake, Prefect's
ephemeral server). It grows with the stages; today it runs the stages that exist."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flows.ingest import ingest
from tasks.ingest import IngestParams
from tasks.lake import Lake


def demo_text_files() -> list[str]:
    """Text present on every Python install: the standard library's own documentation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / "pydoc_data" / "topics.py"), str(stdlib / "this.py")]


def demo(lake_url: str) -> None:
    console = Console()
    ref = ingest(IngestParams(files=demo_text_files()), lake_url=lake_url)
    lake = Lake(lake_url)
    m = lake.resolve(ref)
    table = Table(title="crawl2model demo")
    for col in ("stage", "version", "files", "bytes"):
        table.add_column(col)
    table.add_row("ingest", m.ref, str(m.metrics.get("files")), str(m.metrics.get("bytes")))
    console.print(table)
