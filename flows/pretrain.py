"""Flow `pretrain`: a GPT trained with torchrun on a shard version (see tasks/pretrain.py)."""

from prefect import flow, task
from prefect.logging import get_run_logger

from tasks.lake import Lake
from tasks.pretrain import PretrainParams, pretrain as pretrain_model


@task(name="torchrun-train")
def pretrain_task(lake_url: str | None, params: PretrainParams) -> str:
    return pretrain_model(Lake(lake_url), params, log=get_run_logger().info).ref


@flow(name="pretrain", log_prints=True)
def pretrain(params: PretrainParams = PretrainParams(), lake_url: str | None = None) -> str:
    """Returns the ref of the committed `pretrain` version."""
    return pretrain_task(lake_url, params)
