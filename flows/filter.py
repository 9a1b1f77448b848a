"""Flow `filter`: WARC files -> quality-filtered Parquet documents (see tasks/filter.py)."""

from prefect import flow, task
from prefect.logging import get_run_logger

from tasks.filter import FilterParams, filter_documents
from tasks.lake import Lake


@task(name="filter-documents")
def filter_task(lake_url: str | None, params: FilterParams) -> str:
    return filter_documents(Lake(lake_url), params, log=get_run_logger().info).ref


@flow(name="filter", log_prints=True)
def filter(params: FilterParams = FilterParams(), lake_url: str | None = None) -> str:  # noqa: A001
    """Returns the ref of the committed `filter` version."""
    return filter_task(lake_url, params)
