"""Stage `filter`: WARC -> text -> FineWeb's quality filters -> Parquet documents.

A datatrove pipeline over the WARC files of a `download` version:
HTML responses -> URL blocklist -> prescreen (cheap extraction: drops pages confidently in
another language or made of one repeated phrase before trafilatura runs) -> text extraction ->
language (fastText lid.176) -> Gopher repetition -> Gopher quality -> C4 quality -> FineWeb
quality -> PII masking -> Parquet. FineWeb's thresholds are the defaults; each is a field below.
The word-splitting filters share one `tasks.words.SpacyEnglishSplitter` (datatrove's spaCy
splitter, token for token, at a fraction of the CPU). Work runs in the version's `_work/` folder
with datatrove's completion markers, so a killed run resumes from the tasks it finished.
"""

from __future__ import annotations

import contextlib
import json
from typing import Callable, Literal

from pydantic import Field, field_validator, model_validator

from tasks.cluster import DatatroveExecutorParams, executor_for, ray_cluster
from tasks.errors import StageError
from tasks.lake import Lake, Manifest, Production
from tasks.lid import IDENTIFIERS
from tasks.report import runtime
from tasks.stage import StageParams, Strict, TaskDied, input_ref, local_file, resolve_inputs, run_stage

CODE_VERSION = "filter/3"  # 3: fastText lid.176 for language id, the prescreen before extraction


class GopherRepetition(Strict):
    enabled: bool = True
    dup_line_frac: float = Field(0.3, ge=0, le=1)
    dup_para_frac: float = Field(0.3, ge=0, le=1)
    dup_line_char_frac: float = Field(0.2, ge=0, le=1)
    dup_para_char_frac: float = Field(0.2, ge=0, le=1)
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class GopherQuality(Strict):
    enabled: bool = True
    min_doc_words: int = Field(50, ge=0)
    max_doc_words: int = Field(100_000, ge=1)
    min_avg_word_length: int = Field(3, ge=0)
    max_avg_word_length: int = Field(10, ge=1)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1)
    max_non_alpha_words_ratio: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0)


class C4Quality(Strict):
    enabled: bool = True
    filter_no_terminal_punct: bool = False  # FineWeb turns this C4 rule off
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQuality(Strict):
    enabled: bool = True
    line_punct_thr: float = Field(0.12, ge=0, le=1)
    line_punct_exclude_zero: bool = False
    short_line_thr: float = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=0)
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1)
    new_line_ratio: float = Field(0.3, ge=0, le=1)


class FilterParams(StageParams, DatatroveExecutorParams):
    """The `filter` stage. Every field but `workers` and where it runs (`executor`, ...) is part of the version."""

    input: str = input_ref("download")
    extractor: Literal["trafilatura", "resiliparse"] = "trafilatura"
    favour_precision: bool = Field(True, description="trafilatura's favor_precision (FineWeb's choice)")
    strip_boilerplate: bool = Field(True, description="drop the lines of page furniture the extractor lets through "
                                    "(share bars, related links, bylines, footers: tasks/boilerplate.py)")
    prescreen: bool = Field(True, description="drop pages whose cheap extraction is confidently in another language "
                            "or one repeated phrase before trafilatura runs (tasks.steps.Prescreen)")
    url_filter: bool = True
    languages: list[str] = Field(["en"], min_length=1, description="ISO 639 codes to keep (the 176 of fastText lid.176)")
    language_threshold: float = Field(0.65, ge=0, le=1)
    language_id: Literal[IDENTIFIERS] = Field(  # type: ignore[valid-type]
        "lid.176", description="the language identifier: fastText lid.176 (FineWeb's) or py3langid (97 languages)")
    gopher_repetition: GopherRepetition = GopherRepetition()
    gopher_quality: GopherQuality = GopherQuality()
    c4_quality: C4Quality = C4Quality()
    fineweb_quality: FineWebQuality = FineWebQuality()
    quality_model: list[str] = input_ref("quality-model", many=True, max_length=1, description="a quality-model "
                                         "version (at most one): score every document (column quality_score) and "
                                         "keep those scored at least --quality-threshold, or the --quality-keep-top "
                                         "fraction; off by default")
    quality_threshold: float = Field(0.5, ge=0, le=1, description="with --quality-model: the score a document needs")
    quality_keep_top: float | None = Field(None, gt=0, le=1, description="with --quality-model: keep about this "
                                           "fraction of the crawl's documents instead (the threshold is the "
                                           "model's crawl-sample score quantile)")
    pii: bool = Field(True, description="mask e-mail addresses and public IP addresses")
    removed_sample: int = Field(100, ge=0, le=100_000, description="removed documents kept per filter and task")
    tasks: int = Field(4, ge=1, le=100_000, description="datatrove tasks (output files)")
    workers: int = Field(2, ge=1, le=1024, description="parallel processes of the local executor (on Ray the "
                         "cluster's CPUs); not part of the version")

    @field_validator("languages")
    @classmethod
    def _iso(cls, v: list[str]) -> list[str]:
        from tasks.lid import LANGUAGES

        bad = [x for x in v if x not in LANGUAGES]
        if bad:
            raise ValueError(f"unknown language code {bad[0]!r} (fastText lid.176 knows {len(LANGUAGES)} ISO 639 codes)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _identifier_knows_the_languages(self):
        if self.language_id == "py3langid":
            from tasks.lid import py3langid_model

            bad = [x for x in self.languages if x not in py3langid_model().nb_classes]
            if bad:
                raise ValueError(f"language_id py3langid does not know the language {bad[0]!r} (lid.176 does)")
        return self

    def recipe(self) -> dict:
        unused = set() if self.quality_model else {"quality_threshold", "quality_keep_top"}  # ids kept without one
        return self.model_dump(mode="json", exclude={"input", "quality_model", "rebuild", "workers",
                                                      *self.NOT_IN_VERSION, *unused})


class FilterError(StageError):
    """The stage ran but its result is unusable (e.g. nothing survived)."""


# Points of the funnel, in pipeline order: (meter name, the step it follows).
def build_pipeline(params: FilterParams, warc_folder, paths: list[str], out_folder, removed_folder,
                   crawl: str, quality_model: tuple[str, float] | None = None) -> list:
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.writers.parquet import ParquetWriter

    from tasks.steps import (CompactURLFilter, Extract, Meter, Prescreen, QualityClassifier, RemovedSample,
                             WarcHtmlReader, document_adapter)
    from tasks.words import NewDocument, SpacyEnglishSplitter, spacy_english_rules

    spacy_english_rules()  # read from spaCy once, here, before the workers start
    words = SpacyEnglishSplitter()  # one for all filters: a document is split once

    def removed(name: str):
        return RemovedSample(removed_folder, name, cap=params.removed_sample) if params.removed_sample else None

    steps: list = [WarcHtmlReader(warc_folder, paths=paths, default_metadata={"crawl": crawl}),
                   Meter("html")]
    if params.url_filter:
        steps += [CompactURLFilter(exclusion_writer=removed("url")), Meter("url")]
    steps.append(NewDocument(words))
    if params.prescreen and params.extractor == "trafilatura":  # resiliparse is the cheap extraction itself
        rep = params.gopher_repetition
        steps += [Prescreen(params.languages, params.language_threshold, rep.top_n_grams if rep.enabled else (),
                            words, exclusion_writer=removed("prescreen"), identifier=params.language_id),
                  Meter("prescreen")]
    steps += [Extract(params.extractor, params.favour_precision, params.strip_boilerplate), Meter("extracted"),
              *text_filters(params, removed, words=words)]
    if params.pii:
        # One replacement each: datatrove cycles through a list, which depends on document order.
        steps.append(PIIFormatter(email_replacement="email@example.com", ip_replacement="22.214.171.124"))
    if quality_model:  # last: the score is of the text as it is kept
        steps += [QualityClassifier(*quality_model, exclusion_writer=removed("quality")), Meter("quality")]
    steps.append(ParquetWriter(out_folder, output_filename="${rank}.parquet", adapter=document_adapter,
                               compression="zstd"))
    return steps


def text_filters(params: FilterParams, removed: Callable[[str], object], words=None, url: bool = False) -> list:
    """The heuristic filters of extracted text, each followed by its funnel meter: language,
    Gopher, C4, FineWeb.
    `url`: the URL blocklist first (the pipeline runs it before extraction). Also what
    tasks/quality.py runs on a labelled set, so its evaluation is of the filter as it runs."""
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter

    from tasks.steps import CompactURLFilter, FastGopherRepetition, LanguageId, Meter
    from tasks.words import NewDocument, SpacyEnglishSplitter, spacy_english_rules

    steps: list = []
    if words is None:
        spacy_english_rules()
        words = SpacyEnglishSplitter()
        steps.append(NewDocument(words))
    if url and params.url_filter:
        steps += [CompactURLFilter(exclusion_writer=removed("url")), Meter("url")]
    steps += [LanguageId(params.languages, params.language_threshold, exclusion_writer=removed("language"),
                         identifier=params.language_id), Meter("language")]
    filters = [
        ("gopher_repetition", params.gopher_repetition, FastGopherRepetition),
        ("gopher_quality", params.gopher_quality, GopherQualityFilter),
        ("c4_quality", params.c4_quality, C4QualityFilter),
        ("fineweb_quality", params.fineweb_quality, FineWebQualityFilter),
    ]
    for name, cfg, cls in filters:
        if cfg.enabled:
            kwargs = cfg.model_dump(exclude={"enabled"})
            for k in ("top_n_grams", "dup_n_grams"):
                if k in kwargs:
                    kwargs[k] = tuple(tuple(x) for x in kwargs[k])
            steps += [cls(exclusion_writer=removed(name), language=words, **kwargs), Meter(name)]
    return steps


def read_stats(logs_folder) -> tuple[list[dict], dict]:
    """Merge datatrove's per-task stats files (all tasks, also those done by an earlier,
    killed run); return (the funnel, other counters by step)."""
    from datatrove.utils.stats import PipelineStats

    merged = PipelineStats()
    for path in sorted(logs_folder.list_files("stats")):
        with logs_folder.open(path, "rt") as f:
            merged += PipelineStats.from_json(json.load(f))
    funnel, counters = [], {}
    for step in merged.stats:
        name = step.name.split(": ", 1)[-1]  # "📏 - METER: meter:html" -> "meter:html"
        stats = step.to_dict().get("stats", {})
        if name.startswith("meter:"):
            funnel.append({"point": name[6:], "documents": _total(stats.get("docs")),
                           "bytes": _total(stats.get("bytes"))})
        else:
            counters[name] = {k: _total(v) for k, v in stats.items()}
    return funnel, counters


def _total(v) -> int:
    if isinstance(v, dict):
        return int(v.get("total", v.get("n", 0)))
    return int(v or 0)


def funnel_rows(funnel: list[dict]) -> list[dict]:
    """Each filter's documents and bytes in and out."""
    rows = []
    for prev, cur in zip(funnel, funnel[1:]):
        rows.append({"step": cur["point"], "docs_in": prev["documents"], "docs_out": cur["documents"],
                     "bytes_in": prev["bytes"], "bytes_out": cur["bytes"],
                     "removed": prev["documents"] - cur["documents"]})
    return rows


def funnel_markdown(funnel: list[dict]) -> str:
    lines = ["| step | docs in | docs out | kept | bytes in | bytes out |", "|---|---:|---:|---:|---:|---:|"]
    for r in funnel_rows(funnel):
        kept = f"{100 * r['docs_out'] / r['docs_in']:.1f}%" if r["docs_in"] else "-"
        lines.append(f"| {r['step']} | {r['docs_in']} | {r['docs_out']} | {kept} | {r['bytes_in']} | {r['bytes_out']} |")
    return "\n".join(lines)


def run_datatrove(pipeline: list, tasks: int, workers: int, logs_folder, title: str | None = None,
                  progress=None, where=None) -> None:
    """Run a datatrove pipeline where the stage's parameters `where` say (`tasks.cluster`; None: this
    machine's processes; for Ray, inside `ray_cluster`), with completion markers in `logs_folder`,
    so a rerun skips finished tasks, showing finished tasks as a progress bar and artifact: its
    own, or `progress` (a `tasks.progress.Progress` that a stage of several runs shares)."""
    if title is None:  # <lake>/<kind>/<version>/_work/logs/<step>: "dedup@<version> exact-1"
        kind, version, *_, step = logs_folder.path.rstrip("/").split("/")[-5:]
        title = f"{kind}@{version} {step}"
    import threading

    from tasks.progress import Progress

    executor = executor_for(where, pipeline, tasks, workers, logs_folder)
    stop = threading.Event()
    with contextlib.nullcontext(progress) if progress else Progress(title, files=tasks, unit="tasks") as progress:
        def poll() -> None:
            seen = 0
            while not stop.wait(1.0):
                try:
                    done = len(logs_folder.list_files("completions"))
                except Exception:
                    continue
                if done > seen:
                    progress.advance_files(done - seen)
                    seen = done

        watcher = threading.Thread(target=poll, name="datatrove-progress", daemon=True)
        watcher.start()
        try:
            executor.run()
        except TaskDied as e:
            raise TaskDied(f"{title}: {e}") from None
        finally:
            stop.set()
            watcher.join()


def warc_paths(m: Manifest) -> list[str]:
    return [f["path"] for f in m.files if f["path"].endswith((".warc", ".warc.gz", ".wet.gz", ".arc.gz"))]


def filter_documents(lake: Lake, params: FilterParams, log: Callable[[str], None] = print) -> Manifest:
    from datatrove.io import DataFolder

    inputs = resolve_inputs(lake, params)
    source = inputs["input"]
    paths = warc_paths(source)
    if not paths:
        raise FilterError(f"{source.ref} holds no WARC files")
    classifier = None
    if inputs["quality_model"]:
        qm = inputs["quality_model"][0]
        threshold = params.quality_threshold
        if params.quality_keep_top is not None:  # the crawl sample's score at that quantile
            threshold = qm.metrics["crawl_score_quantiles"][round(100 * (1 - params.quality_keep_top))]
        classifier = (local_file(lake, qm, "model.bin"), threshold)

    def build(prod: Production) -> None:
        def folder(sub: str) -> DataFolder:
            return lake.data_folder(prod.path(sub))

        pipeline = build_pipeline(params, lake.data_folder(lake.path(source.kind, source.version)), paths,
                                  folder("data"), folder("removed"), source.params.get("crawl", "") or "", classifier)
        with ray_cluster(params, lake):
            run_datatrove(pipeline, params.tasks, params.workers, folder("_work/logs"), prod.ref, where=params)
        funnel, counters = read_stats(folder("_work/logs"))
        prod.metrics.update({"funnel": funnel_rows(funnel), "documents": funnel[-1]["documents"],
                             "bytes": funnel[-1]["bytes"], "reader": counters.get("🕷 WARC html", {}),
                             "steps": counters})
        with prod.open("stats.json") as f:
            f.write(json.dumps({"funnel": funnel, "steps": counters}, indent=2).encode())
        log("filter funnel:\n" + funnel_markdown(funnel))
        publish_funnel(funnel, prod.ref)
        if funnel[-1]["documents"] == 0:
            raise FilterError(f"no document survived the filters of {prod.ref}:\n{funnel_markdown(funnel)}")

    return run_stage(lake, "filter", params.recipe(), [source.ref, *(m.ref for m in inputs["quality_model"])],
                     CODE_VERSION, build, rebuild=params.rebuild)


def publish_funnel(funnel: list[dict], ref: str) -> None:
    runtime().table("filter-funnel", funnel_rows(funnel), f"filter funnel of {ref}: documents and bytes in/out per step")


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    return f"{x['funnel'][0]['docs_in']} HTML pages -> {x['documents']} documents ({x['bytes']:,} bytes)"
