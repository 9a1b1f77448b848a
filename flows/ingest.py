"""Flow `ingest`: local files into the lake (see tasks/ingest.py)."""

from prefect import flow, task

from tasks.ingest import IngestParams, ingest_files
from tasks.lake import Lake


@task(name="ingest-files")
def ingest_task(lake_url: str | None, params: IngestParams) -> str:
    return ingest_files(Lake(lake_url), params).ref


@flow(name="ingest", log_prints=True)
def ingest(params: IngestParams, lake_url: str | None = None) -> str:
    return ingest_task(lake_url, params)
