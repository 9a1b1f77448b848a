"""Flow `download`: Common Crawl WARC files into the lake (see tasks/download.py)."""

from prefect import flow, task
from prefect.logging import get_run_logger

from tasks.download import DownloadParams, download as download_files
from tasks.lake import Lake


@task(name="download-files")
def download_task(lake_url: str | None, params: DownloadParams) -> str:
    logger = get_run_logger()
    return download_files(Lake(lake_url), params, log=logger.warning).ref


@flow(name="download", log_prints=True)
def download(params: DownloadParams = DownloadParams(crawl="latest"), lake_url: str | None = None) -> str:
    """Returns the ref of the committed `download` version."""
    return download_task(lake_url, params)
