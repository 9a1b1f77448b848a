"""Flow `tokenizer`: a sentencepiece BPE tokenizer trained on the corpus (see tasks/tokenizer.py)."""

from prefect import flow, task
from prefect.logging import get_run_logger

from tasks.lake import Lake
from tasks.tokenizer import TokenizerParams, train_tokenizer


@task(name="train-tokenizer")
def tokenizer_task(lake_url: str | None, params: TokenizerParams) -> str:
    return train_tokenizer(Lake(lake_url), params, log=get_run_logger().info).ref


@flow(name="tokenizer", log_prints=True)
def tokenizer(params: TokenizerParams = TokenizerParams(), lake_url: str | None = None) -> str:
    """Returns the ref of the committed `tokenizer` version."""
    return tokenizer_task(lake_url, params)
