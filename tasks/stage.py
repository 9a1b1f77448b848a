"""What every stage does around its own work: produce a lake version (or hit the cache),
tell the runtime (Prefect) about it, and hand back a ref. Stages call `run_stage` with a build function."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from common.process import cpu_seconds
from tasks.lake import Lake, LakeError, Manifest, Production
from tasks.errors import StageError
from tasks.report import runtime


class TaskDied(StageError):
    """A worker process of a stage ended without finishing its task (killed, or crashed in C)."""


class Strict(BaseModel):
    """Unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def input_ref(*kinds: str, many: bool = False, description: str | None = None, max_length: int | None = None):
    """A parameter that names an input artifact (a ref), declared on the stage's parameter model:
    the one place the stage graph is written. `kinds` are the kinds it accepts; the first is
    the default (its latest version) and the kind the pipeline feeds it. `many`: a list of refs,
    empty by default (at most `max_length`). The registry reads these to wire the pipeline, resolve and check inputs
    before any work, and write the CLI's options."""
    extra = {"kinds": list(kinds)}
    what = description or f"the {' or '.join(kinds)} version{'s' if many else ''} to read (a ref{'s' if many else ''})"
    if many:
        return Field(default_factory=list, description=what, json_schema_extra=extra, max_length=max_length)
    return Field(kinds[0], description=f"{what}; default: {kinds[0]}@latest", json_schema_extra=extra)


def input_kinds(params: type[BaseModel]) -> dict[str, tuple[str, ...]]:
    """{field: accepted kinds} of a parameter model's `input_ref` fields, in field order."""
    return {name: tuple(f.json_schema_extra["kinds"]) for name, f in params.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and "kinds" in f.json_schema_extra}


def resolve_inputs(lake: Lake, params: BaseModel) -> dict[str, Manifest | list[Manifest]]:
    """Every input of a stage resolved to its committed version and checked against the kinds
    its field accepts, before any work: {field: manifest, or a list for a `many` field}."""
    found: dict[str, Manifest | list[Manifest]] = {}
    read = params.inputs_read() if isinstance(params, StageParams) else set(input_kinds(type(params)))
    for name, kinds in input_kinds(type(params)).items():
        if name not in read:
            continue
        value = getattr(params, name)
        ms = [lake.resolve(ref) for ref in (value if isinstance(value, list) else [value])]
        for m in ms:
            if m.kind not in kinds:
                raise LakeError(f"invalid {name.replace('_', '-')}: {m.ref} is a {m.kind} version; "
                                f"expected {' or '.join(kinds)}")
        found[name] = ms if isinstance(value, list) else ms[0]
    return found


class StageParams(Strict):
    """Base of every stage's parameter model."""

    rebuild: bool = Field(False, description="build again even if this version exists (not part of the version)")

    def inputs_read(self) -> set[str]:
        """The input fields this run reads (the others need not name a version that exists)."""
        return set(input_kinds(type(self)))


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


def local_file(lake: Lake, m: Manifest, name: str, folder: str | None = None) -> str:
    """A local path to one file of a version: in the lake itself when it is a folder, else a copy
    in the cache (downloaded once, checked by its sha256), in a folder keyed by the file's content
    or in `folder` (files a library loads together)."""
    if lake.is_local:
        return lake.path(m.kind, m.version, name)
    from tasks.ingest import sha256_file

    want = next(f["sha256"] for f in m.files if f["path"] == name)
    path = os.path.join(folder or cache_dir("files", want), os.path.basename(name))
    if not os.path.exists(path) or sha256_file(path) != want:
        tmp = f"{path}.{os.getpid()}.tmp"
        with lake.open(m, name) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, path)
    return path


def cache_dir(*parts: str) -> str:
    """A folder of this machine's local cache ($CRAWL2MODEL_CACHE, default under $TMPDIR):
    things worth keeping between runs that are not artifacts (the URL blocklist array, partial
    downloads for an S3 lake, local copies of tokenizers). Created on first use."""
    import tempfile

    root = os.environ.get("CRAWL2MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "crawl2model-cache")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def publish(lake: Lake, m: Manifest, cached: bool) -> None:
    """A markdown artifact per stage run: its version, lineage, parameters and metrics."""
    runtime().markdown(f"{m.kind}-version", lineage_markdown(lake, m) + ("\n\n_cache hit: already built_" if cached else ""),
                       f"{m.ref}" + (" (cache hit)" if cached else ""))


_BUILT_HERE: set[str] = set()  # refs this process built (a waiter that reused a racer's is not)


def built_here(ref: str) -> bool:
    """Whether this process built `ref` (the summaries' "built now"), rather than reusing it."""
    return ref in _BUILT_HERE


def run_stage(lake: Lake, kind: str, recipe: dict, inputs: list[str], code_version: str,
              build: Callable[[Production], None], rebuild: bool = False) -> Manifest:
    """Produce `kind` for this recipe (the parameters that define the output: they make the
    version) and these inputs, or reuse the committed version."""
    flow_run_id, log = runtime().run_id(), runtime().logger()
    started, cpu = time.time(), cpu_seconds()
    with lake.produce(kind, recipe, inputs, code_version, flow_run_id=flow_run_id, rebuild=rebuild) as prod:
        if prod.cached:
            log.info("%s: cache hit, already built", prod.ref)
        else:
            log.info("%s: building%s", prod.ref, " (resuming)" if prod.resumed else "")
            build(prod)
            prod.metrics.setdefault("seconds", round(time.time() - started, 3))
            # every process's CPU (workers' start-up apart): what `plan` scales a crawl's cost by
            prod.metrics.setdefault("cpu_seconds", round(cpu_seconds() - cpu, 3))
    m = prod.manifest
    assert m is not None
    if not prod.cached:
        _BUILT_HERE.add(m.ref)
        log.info("%s: committed %d file(s)", m.ref, len(m.files))
    publish(lake, m, prod.cached)
    return m


def document_files(m: Manifest) -> list[str]:
    """The Parquet files of documents in a filter or dedup version, in order (its removed samples
    and stats are not documents)."""
    return sorted(f["path"] for f in m.files if f["path"].startswith("data/") and f["path"].endswith(".parquet"))
