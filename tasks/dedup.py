"""Stage `dedup`: exact, then MinHash near-duplicate removal, with datatrove's stages.

1. exact: a hash of the normalised text (lowercase, whitespace, punctuation, digits and
   diacritics folded: datatrove's simplify_text); one document kept per hash.
2. MinHash LSH on what is left (FineWeb: word 5-grams, 14 buckets x 8 hashes): signatures ->
   buckets -> clusters (union-find) -> filter; one document kept per cluster.
Each step is a datatrove executor run whose completion markers live in the version's
`_work/` folder, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
from typing import Callable

from pydantic import Field

from tasks.cluster import DatatroveExecutorParams, ray_cluster
from tasks.errors import StageError
from tasks.lake import Lake, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, document_files, input_ref, resolve_inputs, run_stage

CODE_VERSION = "dedup/1"


class DedupParams(StageParams, DatatroveExecutorParams):
    """The `dedup` stage. Every field but `workers` and where it runs (`executor`, ...) is part of the version."""

    input: str = input_ref("filter")
    exact: bool = Field(True, description="remove exact duplicates of the normalised text first")
    minhash: bool = Field(True, description="remove near duplicates with MinHash LSH")
    n_grams: int = Field(5, ge=1, le=50, description="word n-grams per shingle")
    num_buckets: int = Field(14, ge=1, le=1000)
    hashes_per_bucket: int = Field(8, ge=1, le=100)
    seed: int = Field(1, ge=0)
    removed_sample: int = Field(100, ge=0, le=100_000, description="removed documents kept per step and task")
    tasks: int = Field(4, ge=1, le=100_000)
    workers: int = Field(2, ge=1, le=1024, description="parallel processes of the local executor (on Ray the "
                         "cluster's CPUs); not part of the version")

    def recipe(self) -> dict:
        return self.model_dump(mode="json", exclude={"input", "rebuild", "workers", *self.NOT_IN_VERSION})


class DedupError(StageError):
    pass


def normalised_text(doc) -> str:
    from datatrove.utils.text import simplify_text

    return simplify_text(doc.text)


def text_key(text: str) -> str:
    from datatrove.utils.text import simplify_text

    return hashlib.sha1(simplify_text(text).encode()).hexdigest()


def _reader(folder, paths: list[str] | None):
    """Parquet documents: the files listed in `paths`, or every *.parquet of `folder`."""
    from datatrove.pipeline.readers import ParquetReader

    from tasks.steps import ListedParquetReader

    if paths:
        return ListedParquetReader(folder, paths=paths, text_key="text", id_key="id")
    return ParquetReader(folder, text_key="text", id_key="id", glob_pattern="*.parquet")


def dedup_documents(lake: Lake, params: DedupParams, log: Callable[[str], None] = print) -> Manifest:
    from datatrove.io import DataFolder
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster,
                                          MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter,
                                                      ExactDedupSignature, ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.writers.parquet import ParquetWriter
    from datatrove.utils.hashing import HashConfig

    from tasks.filter import read_stats
    from tasks.filter import run_datatrove as run_on
    from tasks.progress import Progress
    from tasks.steps import Meter, RemovedSample, document_adapter

    source = resolve_inputs(lake, params)["input"]
    inputs = document_files(source)
    if not inputs:
        raise DedupError(f"{source.ref} holds no documents")

    def build(prod: Production) -> None:
        def folder(sub: str) -> DataFolder:
            return lake.data_folder(prod.path(sub))

        src = lake.data_folder(lake.path(source.kind, source.version))
        tasks, workers = params.tasks, params.workers
        exact_cfg = ExactDedupConfig(content_getter=normalised_text, hash_config=HashConfig(precision=64))
        mh_cfg = MinhashConfig(n_grams=params.n_grams, num_buckets=params.num_buckets,
                               hashes_per_bucket=params.hashes_per_bucket, seed=params.seed,
                               hash_config=HashConfig(precision=64))
        cap = params.removed_sample

        def removed(name):
            return RemovedSample(folder("removed"), name, cap=cap, rate=1.0) if cap else None

        # one bar for the stage's datatrove runs: tasks of each, in order
        runs = ([tasks, 1, tasks] if params.exact else []) + \
            ([tasks, params.num_buckets, 1, tasks] if params.minhash else [tasks])
        with ray_cluster(params, lake), \
                Progress(f"dedup {prod.ref}", files=sum(runs), unit="tasks") as progress:
            run_datatrove = functools.partial(run_on, where=params, progress=progress)
            current, current_paths = src, inputs
            if params.exact:
                run_datatrove([_reader(current, current_paths), Meter("input"),
                               ExactDedupSignature(folder("_work/exact/sigs"), exact_cfg)],
                              tasks, workers, folder("_work/logs/exact-1"))
                run_datatrove([ExactFindDedups(folder("_work/exact/sigs"), folder("_work/exact/dups"), exact_cfg)],
                              1, 1, folder("_work/logs/exact-2"))
                run_datatrove([_reader(current, current_paths),
                               ExactDedupFilter(folder("_work/exact/dups"), exact_cfg, exclusion_writer=removed("exact")),
                               Meter("exact"),
                               ParquetWriter(folder("_work/exact/out"), output_filename="${rank}.parquet",
                                             adapter=document_adapter, compression="zstd")],
                              tasks, workers, folder("_work/logs/exact-3"))
                current = folder("_work/exact/out")
                current_paths = None
            if params.minhash:
                from tasks.words import SpacyEnglishSplitter, spacy_english_rules

                spacy_english_rules()  # read from spaCy once, here, before the workers start
                reader = _reader(current, current_paths)
                run_datatrove([reader, *([] if params.exact else [Meter("input")]),
                               MinhashDedupSignature(folder("_work/minhash/sigs"), config=mh_cfg,
                                                     language=SpacyEnglishSplitter())],
                              tasks, workers, folder("_work/logs/minhash-1"))
                run_datatrove([MinhashDedupBuckets(folder("_work/minhash/sigs"), folder("_work/minhash/buckets"),
                                                   config=mh_cfg)],
                              params.num_buckets, workers, folder("_work/logs/minhash-2"))
                run_datatrove([MinhashDedupCluster(folder("_work/minhash/buckets"), folder("_work/minhash/clusters"),
                                                   config=mh_cfg, save_cluster_id=True, save_cluster_size=True)],
                              1, 1, folder("_work/logs/minhash-3"))
                run_datatrove([reader,
                               MinhashDedupFilter(folder("_work/minhash/clusters"), exclusion_writer=removed("minhash"),
                                                  load_cluster_ids=True, load_cluster_sizes=True),
                               Meter("minhash"),
                               ParquetWriter(folder("data"), output_filename="${rank}.parquet",
                                             adapter=_dedup_adapter, compression="zstd")],
                              tasks, workers, folder("_work/logs/minhash-4"))
            else:
                run_datatrove([_reader(current, current_paths),
                               *([] if params.exact else [Meter("input")]),
                               ParquetWriter(folder("data"), output_filename="${rank}.parquet",
                                             adapter=_dedup_adapter, compression="zstd")],
                              tasks, workers, folder("_work/logs/copy"))

        funnel = []
        for sub in ("exact-1", "exact-3", "minhash-1", "minhash-4"):
            if lake.fs.exists(prod.path(f"_work/logs/{sub}/stats")):
                funnel += read_stats(folder(f"_work/logs/{sub}"))[0]
        metrics = summarise(lake, prod, funnel)
        prod.metrics.update(metrics)
        with prod.open("stats.json") as f:
            f.write(json.dumps(metrics, indent=2).encode())
        log(f"dedup: {metrics['input_documents']} -> {metrics['documents']} documents "
            f"({metrics['exact_removed']} exact, {metrics['minhash_removed']} near duplicates)")
        publish(metrics, prod.ref)
        if metrics["documents"] == 0:
            raise DedupError(f"no document survived dedup of {source.ref}")

    return run_stage(lake, "dedup", params.recipe(), [source.ref], CODE_VERSION, build, rebuild=params.rebuild)


def _dedup_adapter(self, doc) -> dict:
    from tasks.steps import document_adapter

    row = document_adapter(self, doc)
    row["cluster_id"] = int(doc.metadata.get("minhash_cluster_id", -1))
    row["cluster_size"] = int(doc.metadata.get("minhash_cluster_size", 1))
    return row


def summarise(lake: Lake, prod: Production, funnel: list[dict]) -> dict:
    """Removed counts, the near-duplicate cluster-size histogram and a sample of pairs."""
    import pyarrow.parquet as pq

    points = {p["point"]: p for p in funnel}
    n_in = points.get("input", {}).get("documents", 0)
    after_exact = points.get("exact", points.get("input", {})).get("documents", 0)
    n_out = points.get("minhash", {}).get("documents", after_exact)
    hist: collections.Counter = collections.Counter()
    kept_by_cluster, kept_by_key = {}, {}
    removed = {"exact": [], "minhash": []}
    for step in removed:
        for path in lake.files_under(prod.path(f"removed/{step}")):
            with lake.fs.open(path, "rb") as f:
                removed[step] += pq.read_table(f).to_pylist()
    exact_keys = {text_key(r["text"]) for r in removed["exact"]}
    wanted_clusters = {r.get("cluster_id") for r in removed["minhash"]}
    for path in lake.files_under(prod.path("data")):
        with lake.fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["id", "url", "text", "cluster_id", "cluster_size"]):
                for row in batch.to_pylist():
                    if row["cluster_size"] > 1:
                        hist[row["cluster_size"]] += 1
                        if row["cluster_id"] in wanted_clusters:
                            kept_by_cluster.setdefault(row["cluster_id"], row)
                    if exact_keys:
                        k = text_key(row["text"])
                        if k in exact_keys:
                            kept_by_key.setdefault(k, row)
    pairs = []
    for r in removed["exact"]:
        kept = kept_by_key.get(text_key(r["text"]))
        if kept:
            pairs.append({"kind": "exact", "kept": kept["url"], "removed": r["url"]})
    for r in removed["minhash"]:
        kept = kept_by_cluster.get(r.get("cluster_id"))
        if kept:
            pairs.append({"kind": "minhash", "kept": kept["url"], "removed": r["url"]})
    return {"input_documents": n_in, "exact_removed": n_in - after_exact,
            "minhash_removed": after_exact - n_out, "documents": n_out,
            "bytes": points.get("minhash", points.get("exact", {})).get("bytes", 0),
            "cluster_size_histogram": {str(k): v for k, v in sorted(hist.items())},
            "duplicate_pairs_sample": pairs[:20]}


def publish(metrics: dict, ref: str) -> None:
    rows = [{"step": "input", "documents": metrics["input_documents"]},
            {"step": "exact dedup", "documents": metrics["input_documents"] - metrics["exact_removed"]},
            {"step": "minhash dedup", "documents": metrics["documents"]}]
    runtime().table("dedup-stats", rows, f"dedup of {ref}: documents per step")
    hist = [{"cluster_size": k, "clusters": v} for k, v in metrics["cluster_size_histogram"].items()]
    if hist:
        runtime().table("dedup-clusters", hist, f"{ref}: near-duplicate clusters by size")


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    return (f"{x['input_documents']} -> {x['documents']} documents "
            f"({x['exact_removed']} exact, {x['minhash_removed']} near duplicates removed)")
