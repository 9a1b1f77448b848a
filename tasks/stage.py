"""What every stage does around its own work: produce a lake version (or hit the cache),
tell Prefect about it, and hand back a ref. Stages call `run_stage` with a build function."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from tasks.lake import Lake, Manifest, Production


class TaskDied(RuntimeError):
    """A worker process of a stage ended without finishing its task (killed, or crashed in C)."""


class Strict(BaseModel):
    """Unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class StageParams(Strict):
    """Base of every stage's parameter model."""

    rebuild: bool = Field(False, description="build again even if this version exists (not part of the version)")


def _prefect_context() -> tuple[str | None, object]:
    """The current flow run id and a logger, inside or outside Prefect."""
    try:
        from prefect import runtime
        from prefect.logging import get_run_logger

        run_id = runtime.flow_run.id
        return (str(run_id) if run_id else None), get_run_logger()
    except Exception:
        import logging

        return None, logging.getLogger("crawl2model")


def lineage_markdown(lake: Lake, m: Manifest) -> str:
    lines = [f"# `{m.ref}`", "", f"lake: `{lake.url}`  ", f"created: {m.created_at}  ",
             f"code version: `{m.code_version}`", "", "## Lineage", ""]

    def walk(tree: dict, depth: int) -> None:
        lines.append(f"{'  ' * depth}- `{tree['ref']}`")
        for child in tree["inputs"]:
            walk(child, depth + 1)

    walk(lake.lineage(m.ref), 0)
    lines += ["", "## Parameters", "", "```json", json.dumps(m.params, indent=2), "```"]
    if m.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v) if not isinstance(v, (int, float, str)) else v} |"
                  for k, v in m.metrics.items()]
    return "\n".join(lines)


def cache_dir(*parts: str) -> str:
    """A folder of this machine's local cache ($CRAWL2MODEL_CACHE, default under $TMPDIR):
    things worth keeping between runs that are not artifacts (the URL blocklist array, partial
    downloads for an S3 lake, local copies of tokenizers). Created on first use."""
    import tempfile

    root = os.environ.get("CRAWL2MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "crawl2model-cache")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run: only then are there artifacts to publish."""
    try:
        from prefect.context import get_run_context

        get_run_context()
        return True
    except Exception:
        return False


def publish(lake: Lake, m: Manifest, cached: bool) -> None:
    """A markdown artifact per stage run: its version, lineage, parameters and metrics."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=f"{m.kind}-version",
        markdown=lineage_markdown(lake, m) + ("\n\n_cache hit: already built_" if cached else ""),
        description=f"{m.ref}" + (" (cache hit)" if cached else ""),
    )


_BUILT_HERE: set[str] = set()  # refs this process built (a waiter that reused a racer's is not)


def built_here(ref: str) -> bool:
    """Whether this process built `ref` (the summaries' "built now"), rather than reusing it."""
    return ref in _BUILT_HERE


def run_stage(lake: Lake, kind: str, recipe: dict, inputs: list[str], code_version: str,
              build: Callable[[Production], None], rebuild: bool = False) -> Manifest:
    """Produce `kind` for this recipe (the parameters that define the output: they make the
    version) and these inputs, or reuse the committed version."""
    flow_run_id, log = _prefect_context()
    started = time.time()
    with lake.produce(kind, recipe, inputs, code_version, flow_run_id=flow_run_id, rebuild=rebuild) as prod:
        if prod.cached:
            log.info("%s: cache hit, already built", prod.ref)
        else:
            log.info("%s: building%s", prod.ref, " (resuming)" if prod.resumed else "")
            build(prod)
            prod.metrics.setdefault("seconds", round(time.time() - started, 3))
    m = prod.manifest
    assert m is not None
    if not prod.cached:
        _BUILT_HERE.add(m.ref)
        log.info("%s: committed %d file(s)", m.ref, len(m.files))
    publish(lake, m, prod.cached)
    return m
