"""Flow `dedup`: exact and MinHash near-duplicate removal (see tasks/dedup.py)."""

from prefect import flow, task
from prefect.logging import get_run_logger

from tasks.dedup import DedupParams, dedup_documents
from tasks.lake import Lake


@task(name="dedup-documents")
def dedup_task(lake_url: str | None, params: DedupParams) -> str:
    return dedup_documents(Lake(lake_url), params, log=get_run_logger().info).ref


@flow(name="dedup", log_prints=True)
def dedup(params: DedupParams = DedupParams(), lake_url: str | None = None) -> str:
    """Returns the ref of the committed `dedup` version."""
    return dedup_task(lake_url, params)
