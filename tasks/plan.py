"""`crawl2model plan`: what curating and training on a whole crawl will cost, before any of it runs.

Three sources, each named in the output:
- the crawl's listing (how many WARC files), read like `stage download` reads it (offline
  against a mirror with `--base-url`);
- one file of it, fetched and checked (responses, records and bytes per file);
- what this project measured on its own runs: the committed versions of each stage in the lake
  that record `cpu_seconds` (tasks/stage.py), as CPU per unit of its input (download: per byte,
  filter: per WARC record, dedup: per document, shard: per token) plus a fixed part per run,
  fitted to runs of different sizes (`cost_model`), and the share of documents each keeps (the
  newest run's). A crawl's cost is the fixed part plus the per-unit cost times the crawl's units.
Training is estimated, not measured: 6·N·D FLOPs (N the model preset's parameters, D the tokens)
at the stated peak TFLOP/s and MFU.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable
from urllib.parse import urljoin

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.errors import StageError
from tasks.lake import Lake, Manifest

CURATION = ["download", "filter", "dedup", "shard"]


class PlanError(StageError):
    pass


class PlanParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    crawl: str = Field(description="crawl id (CC-MAIN-2024-51) or 'latest'")
    base_url: str | None = Field(None, description="a mirror laid out like Common Crawl (default: "
                                                   "`stage download`'s, Common Crawl itself)")
    segments: int | None = Field(None, ge=1, description="plan for this many WARC files (default: the whole crawl)")
    bytes_per_file: int | None = Field(None, ge=1, description="assume each WARC file is this many bytes, its "
                                       "responses in the sample's proportion (default: the sampled file's own size; "
                                       "set it when the sample is an excerpt)")
    pages_per_file: int | None = Field(None, ge=1, description="assume each WARC file holds this many "
                                       "responses (pages) (default: in the sampled file's proportion to its bytes)")
    workers: int = Field(64, ge=1, description="CPU workers the curation runs on (wall hours)")
    model_preset: str = Field("gpt2-small", description="the model to train on the tokens")
    gpus: int = Field(8, ge=1)
    gpu_peak_tflops: float = Field(989.0, gt=0, description="per GPU (H100 SXM dense bf16: 989)")
    mfu: float = Field(0.4, gt=0, le=1, description="model FLOPs utilisation")
    usd_per_cpu_hour: float | None = Field(None, ge=0)
    usd_per_gpu_hour: float | None = Field(None, ge=0)
    usd_per_tb_month: float | None = Field(None, ge=0)

    @field_validator("model_preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        from model.config import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown model preset {v!r} (one of {', '.join(PRESETS)})")
        return v


# WET bytes per WARC byte: the one Common Crawl WARC/WET pair of the same page we hold (CC-MAIN-2024-22,
# commoncrawl/whirlwind-python: 3,006 / 18,857 bytes); an assumption for a whole crawl, and said so.
WET_PER_WARC = 3006 / 18857


def _tb(n: float) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e11 else f"{n / 1e9:,.2f} GB"


def plan_markdown(p: dict) -> str:
    """The plan as the markdown artifact of the `plan` flow."""
    s, t = p["sample"], p["train"]
    money = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    lines = [f"# Plan for {p['crawl']}", "",
             f"{p['files']:,} of {p['files_in_crawl']:,} WARC files; sampled `{s['path']}`: {s['records']:,} records "
             f"({s['responses']:,} responses), {s['bytes']:,} bytes.", "",
             "| stage | CPU-hours | wall hours | stored | USD | measured on |", "|---|---:|---:|---:|---:|---|"]
    for r in p["stages"]:
        lines.append(f"| {r['stage']} | {r['cpu_hours']:,.1f} | {r['wall_hours']:,.2f} | {_tb(r['bytes_out'])} | "
                     f"{money(r['usd'])} | `{r['measured_on']}` |")
    lines.append(f"| pretrain {t['model_preset']} | {t['gpu_hours']:,.0f} GPU-h | {t['wall_hours']:,.1f} | - | "
                 f"{money(t['usd'])} | 6·N·D, N {t['params'] / 1e6:,.0f}M, D {t['tokens'] / 1e9:,.2f}B (estimated) |")
    lines += ["", f"Documents: {p['documents_after_filter']:,.0f} after filter, {p['documents_after_dedup']:,.0f} "
              f"after dedup; {p['tokens']:,.0f} tokens; {p['storage_tb']:,.2f} TB stored"
              + ("" if p["storage_usd_per_month"] is None else f" ({p['storage_usd_per_month']:,.0f} USD a month)"),
              "", "## Storage", "", *[f"- {n}" for n in p["storage_notes"]],
              "", "## Assumed", "", *[f"- {a}" for a in p["assumed"]]]
    return "\n".join(lines)


def measured(lake: Lake) -> dict[str, Manifest]:
    """The newest committed version of each curation stage that records its CPU seconds."""
    out = {}
    for kind in CURATION:
        found = [m for m in lake.versions(kind) if m.metrics.get("cpu_seconds") is not None]
        if found:
            out[kind] = found[-1]
    return out


def work_units(lake: Lake, m: Manifest) -> float | None:
    """What a stage's cost scales with, from its manifest: download bytes, responses read by
    filter (its download's: a Common Crawl file's request and metadata records cost it nothing),
    documents into dedup, tokens out of shard."""
    x = m.metrics
    if m.kind == "download":
        return x.get("bytes")
    if m.kind == "filter":
        x = lake.resolve(m.inputs[0]).metrics
        return x.get("records_by_type", {}).get("response") or x.get("records")
    if m.kind == "dedup":
        return x.get("input_documents")
    return (x.get("train_tokens") or 0) + (x.get("val_tokens") or 0) or None


_CONFIG_ONLY = {"download": ("format", "max_records")}  # download's other parameters say what, not how


def cost_model(lake: Lake, newest: Manifest) -> tuple[float, float, int]:
    """(fixed CPU seconds a run, CPU seconds per unit, runs it rests on) for a stage, from every
    committed version of it in the lake with the newest one's configuration: a least-squares line
    through (units, cpu_seconds) when the runs differ in size (their start-up, worker processes
    and model loading are the fixed part, which dominates a small run), else proportional to the
    newest run."""
    keys = _CONFIG_ONLY.get(newest.kind)
    same = [m for m in lake.versions(newest.kind) if m.metrics.get("cpu_seconds") is not None and
            ({k: m.params.get(k) for k in keys} == {k: newest.params.get(k) for k in keys} if keys
             else m.params == newest.params)]
    points = [(u, m.metrics["cpu_seconds"]) for m in same if (u := work_units(lake, m))]
    xs = [x for x, _ in points]
    if len(points) >= 2 and max(xs) >= 1.5 * min(xs):
        n = len(points)
        mx, my = sum(xs) / n, sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
        fixed = my - slope * mx
        if slope > 0 and fixed >= 0:
            return fixed, slope, n
        if slope > 0:  # a line through the origin: no negative start-up cost
            return 0.0, sum(x * y for x, y in points) / sum(x * x for x in xs), n
    units = work_units(lake, newest)
    return 0.0, newest.metrics["cpu_seconds"] / units, 1


def model_params(preset: str, vocab_size: int) -> int:
    """Parameters of a preset: 12·d² per layer (attention 4·d², MLP 8·d²) and the embedding."""
    from model.config import PRESETS

    p = PRESETS[preset]
    return 12 * p["n_layer"] * p["n_embd"] ** 2 + vocab_size * p["n_embd"]


def plan(lake: Lake, params: PlanParams, log: Callable[[str], None] = lambda m: None) -> dict:
    from tasks.download import DownloadParams, fetch, list_crawl_paths, resolve_latest_crawl, select_spread

    runs = measured(lake)
    missing = [k for k in CURATION if k not in runs]
    if missing:
        raise PlanError(f"no measured run of {', '.join(missing)} in lake {lake.url}: run the pipeline once "
                        "(`make demo`, or `crawl2model run --preset demo`) to measure what each stage costs",
                        bad_input=True)
    dl = DownloadParams(crawl=params.crawl, **({"base_url": params.base_url} if params.base_url else {}))
    crawl = resolve_latest_crawl(dl) if params.crawl == "latest" else params.crawl
    paths = list_crawl_paths(dl, crawl)
    files = min(params.segments or len(paths), len(paths))
    sample_path = select_spread(paths, 1, seed=0)[0]
    with tempfile.TemporaryDirectory() as tmp:
        log(f"sampling {sample_path}")
        stats = fetch(urljoin(dl.base_url, sample_path), os.path.join(tmp, "sample.warc.gz"), dl)
    assert stats is not None
    responses = stats.by_type.get("response", 0)

    d, f, dd, sh = (runs[k] for k in CURATION)
    f_in = work_units(lake, f)  # the responses the filter read (its download's)
    f_docs, dd_in, dd_out = f.metrics["documents"], dd.metrics["input_documents"], dd.metrics["documents"]
    sh_tokens = sh.metrics.get("train_tokens", 0) + sh.metrics.get("val_tokens", 0)
    sh_docs = sh.metrics.get("train_documents", 0) + sh.metrics.get("val_documents", 0)
    if not (d.metrics.get("bytes") and f_in and dd_in and sh_tokens):
        raise PlanError("the measured runs lack the counts a plan scales by (bytes, records, documents, tokens)")

    per_file_bytes = params.bytes_per_file or stats.bytes
    bytes_total = files * per_file_bytes
    pages_total = files * (params.pages_per_file or responses * per_file_bytes / stats.bytes)
    docs_filtered = pages_total * f_docs / f_in
    docs_kept = docs_filtered * dd_out / dd_in
    tokens = docs_kept * sh_tokens / max(sh_docs, 1)
    units = {"download": bytes_total, "filter": pages_total, "dedup": docs_filtered, "shard": tokens}
    models = {k: cost_model(lake, runs[k]) for k in CURATION}
    cpu = {k: models[k][0] + models[k][1] * units[k] for k in CURATION}
    stored = {"download": bytes_total,
              "filter": bytes_total * f.metrics.get("bytes", 0) / d.metrics["bytes"],
              "dedup": bytes_total * dd.metrics.get("bytes", f.metrics.get("bytes", 0)) / d.metrics["bytes"],
              "shard": tokens * 2}  # uint16 tokens, before zstd
    rows = []
    for kind in CURATION:
        hours = cpu[kind] / 3600
        fixed, per_unit, n = models[kind]
        rows.append({"stage": kind, "measured_on": runs[kind].ref if n == 1 else f"{n} runs, newest {runs[kind].ref}",
                     "fixed_cpu_seconds": fixed, "cpu_seconds_per_unit": per_unit, "cpu_hours": hours,
                     "wall_hours": hours / params.workers, "bytes_out": stored[kind],
                     "usd": hours * params.usd_per_cpu_hour if params.usd_per_cpu_hour is not None else None})
    sampled = "the sampled file's"
    assumed = [
        f"bytes per file: {params.bytes_per_file:,} as given" if params.bytes_per_file else f"bytes per file: {sampled}",
        f"pages (responses) per file: {params.pages_per_file:,} as given" if params.pages_per_file else
        f"pages (responses) per file: in {sampled} proportion to its bytes" if params.bytes_per_file else
        f"pages (responses) per file: {sampled}",
        "CPU per stage: a fixed part and a part per unit (download byte, response, document, token), fitted "
        "by least squares to the lake's runs of the stage with the same configuration when they differ in size, "
        "else in proportion to its newest run",
        f"training: 6·N·D FLOPs at the given peak {params.gpu_peak_tflops} TFLOP/s and MFU {params.mfu}",
        "shard bytes: 2 per token before compression",
        "the measured runs' keep rates (filter, dedup) hold for the crawl; dedup removes more across a whole "
        "crawl than within a sample",
        f"WET bytes per WARC byte {WET_PER_WARC:.2f}: one page's WARC/WET pair (CC-MAIN-2024-22)"]
    vocab = int(sh.metrics.get("vocab_size") or 50257)
    n = model_params(params.model_preset, vocab)
    flops = 6 * n * tokens
    gpu_hours = flops / (params.gpu_peak_tflops * 1e12 * params.mfu) / 3600
    tb = sum(stored.values()) / 1e12
    return {
        "crawl": crawl, "files": files, "files_in_crawl": len(paths),
        "sample": {"path": sample_path, "bytes": stats.bytes, "records": stats.records, "responses": responses},
        "pages": pages_total, "documents_after_filter": docs_filtered, "documents_after_dedup": docs_kept, "tokens": tokens,
        "stages": rows,
        "train": {"model_preset": params.model_preset, "params": n, "tokens": tokens, "flops": flops,
                  "gpu_hours": gpu_hours, "wall_hours": gpu_hours / params.gpus, "gpus": params.gpus,
                  "usd": gpu_hours * params.usd_per_gpu_hour if params.usd_per_gpu_hour is not None else None},
        "storage_tb": tb,
        "storage_usd_per_month": tb * params.usd_per_tb_month if params.usd_per_tb_month is not None else None,
        "measured": {k: runs[k].ref for k in CURATION},
        "storage_notes": [
            f"the lake keeps every committed version: {_tb(stored['download'])} of WARC (download), "
            f"{_tb(stored['filter'])} of documents (filter), {_tb(stored['dedup'])} after dedup, "
            f"{_tb(stored['shard'])} of tokens (shard)",
            f"after filter is committed the WARC ({100 * stored['download'] / max(sum(stored.values()), 1):.0f}% "
            "of the total) is read again only by a new filter version: delete download/<version>/ from the "
            "object store to save it, and re-download when the filter changes",
            f"--format wet downloads Common Crawl's own text extraction: about {WET_PER_WARC:.0%} of the WARC's "
            "bytes, and filter skips extraction (its largest cost), but FineWeb found WET text worse than "
            "trafilatura on the WARC"],
        "assumed": assumed,
    }

