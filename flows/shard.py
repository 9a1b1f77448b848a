"""Flow `shard`: the corpus tokenised into Parquet token shards (see tasks/shard.py)."""

from prefect import flow, task
from prefect.logging import get_run_logger

from tasks.lake import Lake
from tasks.shard import ShardParams, shard_documents


@task(name="shard-documents")
def shard_task(lake_url: str | None, params: ShardParams) -> str:
    return shard_documents(Lake(lake_url), params, log=get_run_logger().info).ref


@flow(name="shard", log_prints=True)
def shard(params: ShardParams = ShardParams(), lake_url: str | None = None) -> str:
    """Returns the ref of the committed `shard` version."""
    return shard_task(lake_url, params)
