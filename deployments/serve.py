"""Serve every crawl2model flow from this process: deployments without workers. With a Prefect
server running (`make server` starts both), the UI at http://127.0.0.1:4200 lists them and can
run any stage on its own, or the whole pipeline, from a form."""

from prefect import serve
from prefect.schedules import Cron

from flows.dedup import dedup
from flows.download import download
from flows.filter import filter as filter_
from flows.ingest import ingest
from flows.pipeline import pipeline
from flows.pretrain import pretrain
from flows.shard import shard
from flows.tokenizer import tokenizer


def deployments() -> list:
    weekly = pipeline.to_deployment(
        name="weekly", description="The whole pipeline on the newest crawl, every Monday at 03:00 UTC.",
        schedule=Cron("0 3 * * 1", timezone="UTC"),
        parameters={"params": {"download": {"crawl": "latest", "segments": 4}}}, tags=["pipeline"])
    stages = [f.to_deployment(name=f.name) for f in (download, filter_, dedup, tokenizer, shard, pretrain, ingest)]
    return [weekly, pipeline.to_deployment(name="pipeline"), *stages]


def main() -> None:
    serve(*deployments())


if __name__ == "__main__":
    main()
