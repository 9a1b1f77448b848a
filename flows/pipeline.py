"""Flow `pipeline`: crawl to checkpoint, the registry's stages in order (tasks/registry.py),
each a subflow passing lake refs. A stage reads the refs its `input_ref` parameters name: this
run's output of that kind, or its latest version when that stage did not run here.

A stage whose version is already committed is a cache hit (seconds). `from_stage`/`to_stage`
bound the run; `rebuild` builds the named stages again even if committed. A stage that fails
with a user's error ends the pipeline with that stage's Failed state (its one line).
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.logging import get_run_logger

from flows.stages import FLOWS
from tasks.lake import Lake
from tasks.registry import PIPELINE, PipelineParams, stage
from tasks.stage import built_here


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams(), lake_url: str | None = None) -> dict[str, str]:
    """Returns {stage: ref} of every stage it ran."""
    log, lake = get_run_logger(), Lake(lake_url)
    run = PIPELINE[PIPELINE.index(params.from_stage):PIPELINE.index(params.to_stage) + 1]
    refs: dict[str, str] = {}
    for name in run:
        given = getattr(params, name)
        inputs = {field: refs[kinds[0]] if kinds[0] in refs else lake.resolve(kinds[0]).ref
                  for field, kinds in stage(name).inputs.items()
                  if isinstance(getattr(given, field), str)}  # list inputs (extra text) stay as given
        p = given.model_copy(update={**inputs, "rebuild": name in params.rebuild})
        started = time.time()
        state = FLOWS[name](p, lake_url=lake_url, return_state=True)
        if state.is_failed():
            return state  # the stage's one-line error ends the pipeline
        refs[name] = state.result()
        log.info("%s -> %s (%.1fs)", name, refs[name], time.time() - started)
    from tasks.report import runtime

    runtime().table("pipeline-summary", summary_rows(lake, refs), "pipeline: each stage's version")
    return refs


def summary_rows(lake: Lake, refs: dict[str, str]) -> list[dict]:
    """One row per stage: its version, whether it was already built, key numbers."""
    return [{"stage": name, "version": ref, "cache hit": not built_here(ref),
             "numbers": stage(name).summary(lake.resolve(ref).metrics)} for name, ref in refs.items()]


def summary_table(title: str, rows: list[dict]):
    """The rows of `summary_rows` as a rich table for the terminal."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("stage", "version", "built", "numbers"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["stage"], row["version"], "cache hit" if row["cache hit"] else "built now", row["numbers"])
    return table
