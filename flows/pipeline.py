"""Flow `pipeline`: crawl to checkpoint, each stage a subflow passing lake refs.

A stage whose version is already committed is a cache hit (seconds). `from_stage`/`to_stage`
bound the run (stages before `from_stage` use their latest version); `rebuild` builds the
named stages again even if committed.
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import Field, model_validator

from flows.dedup import dedup
from flows.download import download
from flows.filter import filter as filter_
from flows.pretrain import pretrain
from flows.shard import shard
from flows.tokenizer import tokenizer
from tasks.dedup import DedupParams
from tasks.download import DownloadParams
from tasks.filter import FilterParams
from tasks.lake import Lake
from tasks.pretrain import PretrainParams
from tasks.shard import ShardParams
from tasks.stage import Strict, built_here
from tasks.tokenizer import TokenizerParams

STAGES = ("download", "filter", "dedup", "tokenizer", "shard", "pretrain")
Stage = Literal["download", "filter", "dedup", "tokenizer", "shard", "pretrain"]


class PipelineParams(Strict):
    """Every stage's parameters, grouped per stage, and which stages to run."""

    from_stage: Stage = "download"
    to_stage: Stage = "pretrain"
    rebuild: list[Stage] = Field(default_factory=list)
    download: DownloadParams = DownloadParams(crawl="latest")
    filter: FilterParams = FilterParams()
    dedup: DedupParams = DedupParams()
    tokenizer: TokenizerParams = TokenizerParams()
    shard: ShardParams = ShardParams()
    pretrain: PretrainParams = PretrainParams()

    @model_validator(mode="after")
    def _order(self) -> "PipelineParams":
        if STAGES.index(self.from_stage) > STAGES.index(self.to_stage):
            raise ValueError(f"from_stage {self.from_stage!r} comes after to_stage {self.to_stage!r}")
        return self


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams(), lake_url: str | None = None) -> dict[str, str]:
    """Returns {stage: ref} of every stage it ran."""
    log = get_run_logger()
    lake = Lake(lake_url)
    first, last = STAGES.index(params.from_stage), STAGES.index(params.to_stage)
    run = set(STAGES[first:last + 1])

    def ref_of(stage: str, refs: dict) -> str:  # a stage's output: this run's, or the latest
        return refs[stage] if stage in refs else lake.resolve(stage).ref

    def p(stage: str, **inputs):
        return getattr(params, stage).model_copy(update={**inputs, "rebuild": stage in params.rebuild})

    refs: dict[str, str] = {}
    timings: dict[str, float] = {}
    steps = [
        ("download", lambda: download(p("download"), lake_url=lake_url)),
        ("filter", lambda: filter_(p("filter", input=ref_of("download", refs)), lake_url=lake_url)),
        ("dedup", lambda: dedup(p("dedup", input=ref_of("filter", refs)), lake_url=lake_url)),
        ("tokenizer", lambda: tokenizer(p("tokenizer", input=ref_of("dedup", refs)), lake_url=lake_url)),
        ("shard", lambda: shard(p("shard", input=ref_of("dedup", refs), tokenizer=ref_of("tokenizer", refs)),
                                lake_url=lake_url)),
        ("pretrain", lambda: pretrain(p("pretrain", input=ref_of("shard", refs)), lake_url=lake_url)),
    ]
    for stage, call in steps:
        if stage not in run:
            continue
        t = time.time()
        refs[stage] = call()
        timings[stage] = round(time.time() - t, 2)
        log.info("%s -> %s (%.1fs)", stage, refs[stage], timings[stage])
    publish_summary(lake, refs, timings)
    return refs


def summary_rows(lake: Lake, refs: dict[str, str], timings: dict[str, float]) -> list[dict]:
    """One row per stage: its version, time, whether it was already built, key numbers."""
    rows = []
    for stage, ref in refs.items():
        m = lake.resolve(ref)
        rows.append({"stage": stage, "version": ref, "seconds": timings.get(stage, 0.0),
                     "cache hit": not built_here(ref), "numbers": key_numbers(stage, m.metrics)})
    return rows


def summary_table(title: str, rows: list[dict]):
    """The rows of `summary_rows` as a rich table for the terminal."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("stage", "version", "built", "numbers"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["stage"], row["version"], "cache hit" if row["cache hit"] else "built now", row["numbers"])
    return table


def key_numbers(kind: str, x: dict) -> str:
    if kind == "download":
        return f"{x['files']} WARC files, {x['records']} records ({x['records_by_type'].get('response', 0)} responses)"
    if kind == "filter":
        return f"{x['funnel'][0]['docs_in']} HTML pages -> {x['documents']} documents ({x['bytes']:,} bytes)"
    if kind == "dedup":
        return (f"{x['input_documents']} -> {x['documents']} documents "
                f"({x['exact_removed']} exact, {x['minhash_removed']} near duplicates removed)")
    if kind == "tokenizer":
        return (f"vocab {x['vocab_size']:,}, {x['bytes_per_token']:.2f} bytes/token "
                f"(cl100k {x['cl100k_bytes_per_token']:.2f}), round trip {x['roundtrip_exact']:.0%}")
    if kind == "shard":
        return f"{x['train_tokens']:,} train / {x['val_tokens']:,} val tokens"
    if kind == "pretrain":
        return f"{x['steps']} steps, loss {x['final_loss']}, val loss {x.get('val_loss')}"
    return ""


def publish_summary(lake: Lake, refs: dict[str, str], timings: dict[str, float]) -> None:
    from prefect.artifacts import create_table_artifact

    rows = summary_rows(lake, refs, timings)
    create_table_artifact(key="pipeline-summary", table=rows, description="pipeline: each stage's version and time")
