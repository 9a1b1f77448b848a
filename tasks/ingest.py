"""Stage `ingest`: local files into the lake as one artifact, content-addressed by their
bytes. The smallest real stage: it proves lake + Prefect + CLI connect, and lets a user add
their own text or WARC files to the lake."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from pydantic import Field, field_validator

from tasks.lake import Lake, LakeError, Manifest, Production
from tasks.stage import StageParams, run_stage

CODE_VERSION = "ingest/1"


class IngestParams(StageParams):
    """Files to copy into the lake, under their base names."""

    files: list[str] = Field(min_length=1, description="local file paths")

    @field_validator("files")
    @classmethod
    def _readable_and_unique(cls, files: list[str]) -> list[str]:
        names = set()
        for f in files:
            if not os.path.isfile(f):
                raise ValueError(f"{f}: no such file")
            if not os.access(f, os.R_OK):
                raise ValueError(f"{f}: not readable")
            name = os.path.basename(f)
            if name in names or name.startswith("_"):
                raise ValueError(f"{f}: duplicate or reserved file name {name!r}")
            names.add(name)
        return files


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ingest_files(lake: Lake, params: IngestParams, log: Callable[[str], None] = print) -> Manifest:
    # The version depends on the bytes, not on where the files were on this machine.
    content = {"files": sorted([Path(f).name, sha256_file(f)] for f in params.files)}

    def build(prod: Production) -> None:
        for f in params.files:
            prod.put_file(f, Path(f).name)
        got = {name: digest for name, (digest, _) in prod.written.items()}
        for name, digest in content["files"]:
            if got.get(name) != digest:
                raise LakeError(f"{name} changed while it was being copied into the lake")
        prod.metrics["files"] = len(params.files)
        prod.metrics["bytes"] = sum(os.path.getsize(f) for f in params.files)

    return run_stage(lake, "ingest", content, [], CODE_VERSION, build, rebuild=params.rebuild)


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    return f"{x['files']} file(s), {x['bytes']:,} bytes"
